SELECT customers.name FROM public.customers LIMIT 1
