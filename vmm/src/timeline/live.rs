//! The solo timeline: every answer comes from the [`World`], and nothing
//! is logged.

use super::world::{host_entropy, World};
use super::{Demand, Ending, Error, Input, Output, Position, StateDigest, Timeline};
use crate::stop;

/// The solo timeline.
pub struct Live {
    world: World,
}

impl Live {
    pub fn new(world: World) -> Self {
        Live { world }
    }
}

impl Timeline for Live {
    fn clock_ns(&mut self, _at: &Position) -> Result<u64, Error> {
        Ok(self.world.clock_ns())
    }

    fn wall_clock(&mut self, _at: &Position) -> Result<i64, Error> {
        Ok(self.world.wall_clock())
    }

    fn entropy(&mut self, _at: &Position) -> Result<u64, Error> {
        host_entropy()
    }

    fn inputs(
        &mut self,
        _at: &Position,
        demand: &Demand,
        out: &mut Vec<Input>,
    ) -> Result<(), Error> {
        self.world.poll(demand, out, &|| false)
    }

    fn interrupt(&mut self, _at: &Position, _vector: u8) -> Result<(), Error> {
        Ok(())
    }

    fn wants_digest(&mut self, _at: &Position, _requested: bool) -> bool {
        false
    }

    fn digest(&mut self, _at: &Position, _digest: &StateDigest) -> Result<(), Error> {
        Ok(())
    }

    fn output(&mut self, _at: &Position, output: Output) -> Result<(), Error> {
        self.world.output(output)
    }

    fn stop_here(&mut self, _at: &Position) -> Result<bool, Error> {
        Ok(stop::requested())
    }

    fn finish(&mut self, _at: &Position, _: Ending, _: &StateDigest) -> Result<(), Error> {
        self.world.close()
    }
}
