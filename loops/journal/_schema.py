"""The journal's SQLite schema and its migrations (one transaction per version)."""

from __future__ import annotations

import sqlite3

from loops.journal._model import JournalError

SCHEMA_VERSION = 5

# ------------------------------------------------------------------ schema
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        """CREATE TABLE campaigns (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            program TEXT NOT NULL,
            created REAL NOT NULL,
            state TEXT NOT NULL,
            optimizer_state TEXT,
            updated REAL NOT NULL)""",
        """CREATE TABLE experiments (
            id TEXT PRIMARY KEY,
            campaign_id TEXT NOT NULL REFERENCES campaigns(id),
            seq INTEGER NOT NULL,
            station TEXT,
            params TEXT NOT NULL,
            proposer TEXT NOT NULL,
            state TEXT NOT NULL,
            step INTEGER,
            recipe TEXT,
            result TEXT,
            objective REAL,
            verified INTEGER CHECK (verified IN (0, 1)),
            reason TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            UNIQUE (campaign_id, seq))""",
        "CREATE INDEX experiments_by_state ON experiments (campaign_id, state)",
        """CREATE TABLE transitions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            experiment_id TEXT REFERENCES experiments(id),
            campaign_id TEXT NOT NULL REFERENCES campaigns(id),
            t REAL NOT NULL,
            event TEXT NOT NULL,
            state TEXT NOT NULL,
            step INTEGER,
            data TEXT)""",
        "CREATE INDEX transitions_by_experiment ON transitions (experiment_id, id)",
        "CREATE INDEX transitions_by_campaign ON transitions (campaign_id, id)",
        """CREATE TRIGGER transitions_no_update BEFORE UPDATE ON transitions
            BEGIN SELECT RAISE(ABORT, 'journal transitions are append-only'); END""",
        """CREATE TRIGGER transitions_no_delete BEFORE DELETE ON transitions
            BEGIN SELECT RAISE(ABORT, 'journal transitions are append-only'); END""",
        "INSERT INTO schema_version (version) VALUES (0)",
    ),
    2: (
        # the safety layer's verdicts on each experiment's commands (allowed and refused)
        """CREATE TABLE verdicts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            campaign_id TEXT NOT NULL REFERENCES campaigns(id),
            experiment_id TEXT REFERENCES experiments(id),
            station TEXT NOT NULL,
            t REAL NOT NULL,
            who TEXT,
            command TEXT NOT NULL,
            allowed INTEGER NOT NULL CHECK (allowed IN (0, 1)),
            rule TEXT,
            reason TEXT NOT NULL,
            data TEXT)""",
        "CREATE INDEX verdicts_by_experiment ON verdicts (experiment_id, id)",
        "CREATE INDEX verdicts_by_campaign ON verdicts (campaign_id, id)",
        # camera frames on disk by content hash, and which experiment they belong to
        """CREATE TABLE images (
            sha256 TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE experiment_images (
            experiment_id TEXT NOT NULL REFERENCES experiments(id),
            role TEXT NOT NULL,
            sha256 TEXT NOT NULL REFERENCES images(sha256),
            PRIMARY KEY (experiment_id, role))""",
    ),
    3: (
        # the campaign's owner: each run/resume takes a higher epoch; older owners are fenced
        "ALTER TABLE campaigns ADD COLUMN owner_epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN owner TEXT",
        "ALTER TABLE campaigns ADD COLUMN owner_since REAL",
        # what each station's safety budgets consumed, when (its clock and the wall clock)
        """CREATE TABLE consumption (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            station TEXT NOT NULL,
            resource TEXT NOT NULL,
            amount REAL NOT NULL,
            t_clock REAL NOT NULL,
            t_wall REAL NOT NULL)""",
        "CREATE INDEX consumption_by_station ON consumption (station, t_wall)",
    ),
    4: (
        # what the guard would commit for a step that started, counted until the step's actual
        # consumption replaces it (a kill between the command and step_done loses nothing)
        "ALTER TABLE consumption ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0 "
        "CHECK (reserved IN (0, 1))",
        # a finished run's JPEGs, journaled with its outcome (event 'outcome') until the result
        # that cites them is recorded (they are written under images/ then)
        """CREATE TABLE outcome_images (
            experiment_id TEXT NOT NULL REFERENCES experiments(id),
            role TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (experiment_id, role))""",
    ),
    5: (
        # an agent's proposal awaiting a human (loops/journal/_approvals.py): why and until when
        # (wall clock), then the decision (who, why, through what) the campaign applies
        """CREATE TABLE approvals (
            experiment_id TEXT PRIMARY KEY REFERENCES experiments(id),
            campaign_id TEXT NOT NULL REFERENCES campaigns(id),
            rules TEXT NOT NULL,
            requested REAL NOT NULL,
            expires REAL NOT NULL,
            decision TEXT CHECK (decision IN ('approve', 'deny')),
            who TEXT,
            reason TEXT,
            via TEXT,
            decided REAL)""",
        "CREATE INDEX approvals_by_campaign ON approvals (campaign_id)",
    ),
}


def _schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if row is None:
        return 0
    got = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if got is None else int(got[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the journal schema to :data:`SCHEMA_VERSION`, one transaction per version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Returns the
    version it found. A journal written by a newer labbridge is refused.
    """
    found = _schema_version(conn)
    if found > SCHEMA_VERSION:
        raise JournalError(
            f"journal schema version {found} is newer than this labbridge supports "
            f"({SCHEMA_VERSION}); upgrade labbridge to open it"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _schema_version(conn) < version:  # another process may have migrated meanwhile
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (version,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return found
