SELECT * FROM orders WHERE id = $1
