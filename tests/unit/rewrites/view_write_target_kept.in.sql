UPDATE customers SET name = 'x' WHERE id IN (SELECT id FROM customers WHERE name = 'y')
