SELECT c.name FROM customers c WHERE c.id = 3 LIMIT 5
