UPDATE customers SET name = 'x' WHERE id IN (SELECT id FROM safe.customers_v AS customers WHERE name = 'y')
