SELECT 1 LIMIT 1; SELECT id, customer, total FROM orders_v WHERE id = 5 LIMIT 1000; SET work_mem = '8MB'
