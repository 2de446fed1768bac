delete from sessions where user_id = 9
