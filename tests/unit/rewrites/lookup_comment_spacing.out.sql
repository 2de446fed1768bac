/* app */ SELECT id, customer, total FROM orders_v WHERE id = 7 LIMIT 1000
