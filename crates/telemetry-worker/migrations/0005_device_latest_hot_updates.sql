-- Every batch rewrites the row of each device it holds. With free space left in each page,
-- PostgreSQL updates a row in place of the same page (a HOT update) and adds no entry to the
-- primary key's index, so the upsert costs the database less. The table has one row per
-- device, so the space left free is small. Applies to pages written from now on.
ALTER TABLE device_latest SET (fillfactor = 50);
