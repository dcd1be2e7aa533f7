//! The backup's record source: records stream in from the primary, and the
//! backup never runs its vCPU past the last position the primary has
//! declared complete (by a horizon marker, or by a record at a later exit).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use logchannel::channel::BackupLink;
use logchannel::{Event, Record};

use super::metrics::Metrics;
use crate::timeline::replay::RecordSource;
use crate::timeline::Error;

/// Records received but not yet replayed, and how far they reach.
pub struct StreamSource {
    link: BackupLink,
    metrics: Arc<Metrics>,
    buffered: VecDeque<Record>,
    /// Every event at exits up to this one has been received.
    known_exit: u64,
    last_seq: Option<u64>,
}

impl StreamSource {
    pub fn new(link: BackupLink, metrics: Arc<Metrics>) -> Self {
        metrics.set_link(link.state());
        StreamSource {
            link,
            metrics,
            buffered: VecDeque::new(),
            known_exit: 0,
            last_seq: None,
        }
    }

    fn take(&mut self, rec: Record) {
        if rec.event == Event::Horizon {
            self.known_exit = self.known_exit.max(rec.pos.exit);
        } else {
            // Records come in position order: one at exit N means the
            // primary finished every exit before N.
            self.known_exit = self.known_exit.max(rec.pos.exit.saturating_sub(1));
            self.buffered.push_back(rec);
        }
    }

    /// Moves whatever has arrived into the buffer, without blocking.
    fn drain(&mut self) -> Result<(), Error> {
        while let Some(rec) = self
            .link
            .try_recv()
            .map_err(|e| Error::Channel(e.to_string()))?
        {
            self.take(rec);
        }
        if self.link.is_finished() {
            self.end()?;
        }
        Ok(())
    }

    /// The primary said goodbye: everything is known.
    fn end(&mut self) -> Result<(), Error> {
        match self.link.try_recv() {
            Err(e) => Err(Error::Channel(e.to_string())),
            Ok(_) => {
                self.known_exit = u64::MAX;
                Ok(())
            }
        }
    }
}

impl RecordSource for StreamSource {
    fn peek(&mut self) -> Result<Option<&Record>, Error> {
        if self.buffered.is_empty() {
            self.drain()?;
        }
        Ok(self.buffered.front())
    }

    fn advance(&mut self) {
        if let Some(r) = self.buffered.pop_front() {
            self.last_seq = Some(r.seq);
            self.metrics.replayed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn wait_horizon(&mut self, exit: u64) -> Result<(), Error> {
        if self.known_exit >= exit {
            return Ok(());
        }
        // Caught up: say so now, so the primary measures lag at this moment.
        self.link.report_progress(exit - 1);
        while self.known_exit < exit {
            match self
                .link
                .recv()
                .map_err(|e| Error::Channel(e.to_string()))?
            {
                Some(rec) => self.take(rec),
                None => self.known_exit = u64::MAX,
            }
        }
        self.link.state().set_replayed_exit(exit - 1);
        Ok(())
    }

    fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }
}
