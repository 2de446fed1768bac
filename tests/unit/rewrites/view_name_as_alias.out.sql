SELECT customers.name FROM safe.customers_v AS customers LIMIT 1
