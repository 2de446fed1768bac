SELECT random() * 10 AS r LIMIT 1
