// Package sqlstore is what backup's and relay's stores share below their own
// tables: opening the database (one opener per driver, with our pool and
// pragma settings) and running a service's numbered migrations, recorded in
// that service's own version table.
package sqlstore

// Migration is one numbered schema step.
type Migration struct {
	Version int
	Name    string
	SQL     []string
}

// Migrations are one service's steps and the table that records which of
// them ran. Each service has its own table: two services numbering one table
// would collide.
type Migrations struct {
	// Table is a constant SQL identifier (it is written into the SQL).
	Table string
	Steps []Migration
}

func (m Migrations) createTable() string {
	return `CREATE TABLE IF NOT EXISTS ` + m.Table + ` (
	version INTEGER PRIMARY KEY,
	name TEXT NOT NULL,
	applied_at_ms BIGINT NOT NULL
)`
}

func (m Migrations) appliedVersions() string { return `SELECT version FROM ` + m.Table }

func (m Migrations) record() string {
	return `INSERT INTO ` + m.Table + ` (version, name, applied_at_ms) VALUES ($1, $2, $3)
ON CONFLICT (version) DO NOTHING`
}
