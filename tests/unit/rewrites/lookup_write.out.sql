UPDATE sessions SET ended = CURRENT_TIMESTAMP WHERE user_id = 9 AND ended IS NULL
