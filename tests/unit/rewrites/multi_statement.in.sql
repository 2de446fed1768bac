SELECT 1 LIMIT 1; select * from orders where id = 5; SET work_mem = '8MB'
