//! The test-and-set arbiter (see docs/ARCHITECTURE.md); filled in by the failover work.
