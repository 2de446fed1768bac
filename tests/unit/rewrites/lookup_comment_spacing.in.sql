/* app */ SELECT *
  FROM orders -- by id
 WHERE id = 7
