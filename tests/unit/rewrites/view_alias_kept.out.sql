SELECT c.name FROM safe.customers_v AS c WHERE c.id = 3 LIMIT 5
