-- Every presence session the app has set, live or recently finished.
-- Times are milliseconds since the Unix epoch (UTC).
CREATE TABLE sessions (
    user_id     TEXT    NOT NULL,
    session_id  TEXT    NOT NULL,
    owner       TEXT,
    state       TEXT    NOT NULL
        CHECK (state IN ('tracked', 'clearing', 'cleared', 'dropped', 'failed')),
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    -- When the scheduler must act next: the deadline while tracked, the next
    -- try while clearing, NULL once terminal.
    due_at      INTEGER,
    last_error  TEXT,
    finished_at INTEGER,
    -- Bumped by every renewal, so that the answer to a clear sent before the
    -- renewal cannot end the renewed session.
    generation  INTEGER NOT NULL DEFAULT 0,
    -- The clear-all request that marked this session, for waiting callers.
    clear_batch INTEGER,
    PRIMARY KEY (user_id, session_id),
    CHECK ((state IN ('tracked', 'clearing')) = (due_at IS NOT NULL))
) WITHOUT ROWID;

CREATE INDEX sessions_due ON sessions (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX sessions_finished ON sessions (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX sessions_batch ON sessions (clear_batch) WHERE clear_batch IS NOT NULL;
