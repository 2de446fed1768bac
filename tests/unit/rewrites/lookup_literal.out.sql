SELECT id, customer, total FROM orders_v WHERE id = 42 LIMIT 1000
