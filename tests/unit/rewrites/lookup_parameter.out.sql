SELECT id, customer, total FROM orders_v WHERE id = $1 LIMIT 1000
