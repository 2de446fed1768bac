SELECT * FROM orders WHERE id = 42 AND total > 10 LIMIT 5
