select *  from ORDERS where id=42
