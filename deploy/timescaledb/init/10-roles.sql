-- Runs once, when the timescaledb volume is created. The worker owns the schema (as the
-- `telemetry` user, through `telemetry-worker migrate` or its start-up); the query API reads it
-- as `telemetry_reader`, which may only SELECT (telemetry-api's migration grants it the tables it
-- reads and would create the role itself, without a password, if it were missing). Both
-- passwords are development defaults.
CREATE EXTENSION IF NOT EXISTS timescaledb;
CREATE ROLE telemetry_reader LOGIN PASSWORD 'telemetry_reader';
ALTER ROLE telemetry_reader SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE telemetry TO telemetry_reader;
GRANT USAGE ON SCHEMA public TO telemetry_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE telemetry IN SCHEMA public GRANT SELECT ON TABLES TO telemetry_reader;
