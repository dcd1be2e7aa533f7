//! The wire protocol between primary and backup (see docs/ARCHITECTURE.md); filled in by the live-replication work.
