-- Per-user API tokens. Only the SHA-256 of a token is stored: the token itself is shown once,
-- when `telemetry-api token create` makes it, and cannot be recovered from this table.
CREATE TABLE api_tokens (
    id          bigserial   PRIMARY KEY,
    user_id     text        NOT NULL,
    token_hash  bytea       NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    label       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX api_tokens_user_idx ON api_tokens (user_id);
