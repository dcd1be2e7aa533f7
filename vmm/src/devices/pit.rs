//! The i8254 programmable interval timer (ports 0x40-0x43) and the channel 2
//! gate/speaker port 0x61.
//!
//! The counters run off a 1 193 182 Hz input clock, so what a guest reads
//! depends on the current time. The model never reads a clock: the caller
//! passes `now_ns` (monotonic nanoseconds from the timeline) and asks
//! [`Pit::uses_clock`] first, because every clock read the caller makes is
//! logged for replay. A counter's value is computed from `now_ns` minus the
//! time its reload value was written, so nothing has to tick in between.
//!
//! The model does not deliver IRQ0 either: [`Pit::channel0_period_ns`] tells
//! the VMM the rate at which to schedule ticks through the timeline.
//!
//! Modelled: the mode/command register (channel, access mode, modes 0-5,
//! with 6 and 7 read as 2 and 3), the counter latch command, the read-back
//! command (count and status latches), lobyte/hibyte/word access with its
//! flip-flops, reload value 0 meaning 65536, the OUT pins (for read-back
//! status and port 0x61 bit 5).
//!
//! Simplifications (all deterministic, none can panic): BCD counting is
//! accepted but counts in binary; the gate inputs are not timed: channel 2's
//! gate bit in port 0x61 is stored and read back but does not start, stop or
//! retrigger the counter, so modes 1 and 5 count like modes 0 and 4 from the
//! moment the reload value is written; writing the first byte of a word
//! does not stop the counter; a mode command stops the channel (it reads its
//! reload value until a new one is written); port 0x61 bit 4 (the refresh
//! toggle) reads as 0, so the port is stable apart from OUT2.

/// I/O port of channel 0's counter.
pub const CHANNEL0: u16 = 0x40;
/// I/O port of channel 1's counter.
pub const CHANNEL1: u16 = 0x41;
/// I/O port of channel 2's counter.
pub const CHANNEL2: u16 = 0x42;
/// I/O port of the mode/command register (write only).
pub const COMMAND: u16 = 0x43;
/// I/O port of the NMI status and control register: channel 2 gate (bit 0),
/// speaker data (bit 1), channel 2 OUT (bit 5, read only).
pub const PORT_61: u16 = 0x61;

/// The PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Port 0x61 bits the guest can write and read back.
const PORT_61_WRITABLE: u8 = 0x0f;
/// Port 0x61 bit 5: channel 2 OUT.
const PORT_61_OUT2: u8 = 0x20;

/// How the guest reads and writes a counter's 16 bits through one 8-bit
/// port (command bits 5-4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Access {
    /// Low byte only (01).
    LoByte,
    /// High byte only (10).
    HiByte,
    /// Low byte then high byte (11).
    #[default]
    LoHi,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::LoByte => 1,
            Access::HiByte => 2,
            Access::LoHi => 3,
        }
    }
}

/// One counter's registers, as moved by state transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PitChannelState {
    /// Counting mode 0-5 (6 and 7 are stored as 2 and 3).
    pub mode: u8,
    /// Access mode from the last command.
    pub access: Access,
    /// BCD bit from the last command (stored; counting stays binary).
    pub bcd: bool,
    /// The reload value as written; 0 means 65536.
    pub reload: u16,
    /// When the reload value was written (`now_ns`), or `None` while the
    /// channel is not counting (never loaded, or a mode command since).
    pub load_ns: Option<u64>,
    /// Word writes: the low byte, waiting for its high byte.
    pub write_lo: Option<u8>,
    /// Word reads: the low byte was read, the next read is the high byte.
    pub read_hi_next: bool,
    /// A count latched by a latch or read-back command, with its own
    /// flip-flop: `latched_hi_next` says the low byte was already read.
    pub latched: Option<u16>,
    /// See [`PitChannelState::latched`].
    pub latched_hi_next: bool,
    /// A status byte latched by a read-back command; read before the count.
    pub status: Option<u8>,
}

/// The whole timer, as moved by state transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PitState {
    /// Channels 0, 1 and 2.
    pub channels: [PitChannelState; 3],
    /// The writable bits of port 0x61 (gate 2, speaker, parity enables).
    pub port61: u8,
}

impl PitChannelState {
    /// The reload value as a count: 0 means 65536.
    fn divisor(&self) -> u64 {
        if self.reload == 0 {
            0x1_0000
        } else {
            u64::from(self.reload)
        }
    }

    /// Input clock ticks since the reload value was written.
    fn ticks(load_ns: u64, now_ns: u64) -> u64 {
        let elapsed = u128::from(now_ns.saturating_sub(load_ns));
        // elapsed < 2^64, so the quotient fits in u64.
        (elapsed * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)) as u64
    }

    /// The counting element's value at `now_ns` (0 stands for 65536).
    fn count(&self, now_ns: u64) -> u16 {
        let Some(load_ns) = self.load_ns else {
            return self.reload;
        };
        let d = self.divisor();
        let t = Self::ticks(load_ns, now_ns);
        let value = match self.mode {
            2 => d - t % d,
            3 => (d - (2 * (t % d)) % d) & 0x1_fffe,
            // Modes 0, 1, 4, 5 count down once and wrap through 0xffff.
            _ => (d + 0x1_0000 - t % 0x1_0000) % 0x1_0000,
        };
        value as u16
    }

    /// The OUT pin at `now_ns`.
    fn out(&self, now_ns: u64) -> bool {
        let Some(load_ns) = self.load_ns else {
            // After a mode command OUT is low in mode 0, high otherwise.
            return self.mode != 0;
        };
        let d = self.divisor();
        let t = Self::ticks(load_ns, now_ns);
        match self.mode {
            0 | 1 => t >= d,
            2 => d < 2 || t % d != d - 1,
            3 => t % d < d.div_ceil(2),
            _ => t != d,
        }
    }

    fn status_byte(&self, now_ns: u64) -> u8 {
        let out = if self.out(now_ns) { 0x80 } else { 0 };
        let null_count = if self.load_ns.is_none() { 0x40 } else { 0 };
        out | null_count | (self.access.bits() << 4) | (self.mode << 1) | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.latched.is_none() {
            self.latched = Some(self.count(now_ns));
            self.latched_hi_next = false;
        }
    }

    /// Whether a read of this channel's port needs the time.
    fn read_uses_clock(&self) -> bool {
        self.status.is_none() && self.latched.is_none() && self.load_ns.is_some()
    }

    /// Whether a write to this channel's port completes a reload value.
    fn write_completes_reload(&self) -> bool {
        self.access != Access::LoHi || self.write_lo.is_some()
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if let Some(status) = self.status.take() {
            return status;
        }
        if let Some(latched) = self.latched {
            let [lo, hi] = latched.to_le_bytes();
            return match self.access {
                Access::LoByte => {
                    self.latched = None;
                    lo
                }
                Access::HiByte => {
                    self.latched = None;
                    hi
                }
                Access::LoHi if self.latched_hi_next => {
                    self.latched = None;
                    self.latched_hi_next = false;
                    hi
                }
                Access::LoHi => {
                    self.latched_hi_next = true;
                    lo
                }
            };
        }
        let [lo, hi] = self.count(now_ns).to_le_bytes();
        match self.access {
            Access::LoByte => lo,
            Access::HiByte => hi,
            Access::LoHi => {
                self.read_hi_next = !self.read_hi_next;
                if self.read_hi_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write(&mut self, value: u8, now_ns: u64) {
        let reload = match self.access {
            Access::LoByte => u16::from(value),
            Access::HiByte => u16::from(value) << 8,
            Access::LoHi => match self.write_lo.take() {
                None => {
                    self.write_lo = Some(value);
                    return;
                }
                Some(lo) => u16::from_le_bytes([lo, value]),
            },
        };
        self.reload = reload;
        self.load_ns = Some(now_ns);
    }

    fn set_mode(&mut self, access: Access, mode: u8, bcd: bool) {
        self.access = access;
        self.mode = if mode > 5 { mode - 4 } else { mode };
        self.bcd = bcd;
        self.load_ns = None;
        self.write_lo = None;
        self.read_hi_next = false;
    }
}

/// What a write to the command port asks for.
enum Command {
    /// Counter latch command for one channel.
    Latch(usize),
    /// Read-back: which channels, latch count, latch status.
    ReadBack { mask: u8, count: bool, status: bool },
    /// Set a channel's access mode and counting mode.
    Mode {
        channel: usize,
        access: Access,
        mode: u8,
        bcd: bool,
    },
}

impl Command {
    fn decode(value: u8) -> Self {
        let channel = usize::from(value >> 6);
        if channel == 3 {
            return Command::ReadBack {
                mask: (value >> 1) & 0x7,
                count: value & 0x20 == 0,
                status: value & 0x10 == 0,
            };
        }
        let access = match (value >> 4) & 3 {
            0 => return Command::Latch(channel),
            1 => Access::LoByte,
            2 => Access::HiByte,
            _ => Access::LoHi,
        };
        Command::Mode {
            channel,
            access,
            mode: (value >> 1) & 7,
            bcd: value & 1 != 0,
        }
    }
}

/// The i8254 timer with the port 0x61 gate/speaker register.
#[derive(Clone, Debug, Default)]
pub struct Pit {
    state: PitState,
}

impl Pit {
    /// A timer with no channel counting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a timer from a state taken with [`Pit::state`]. Load times
    /// are in the same `now_ns` time base as before.
    pub fn from_state(state: &PitState) -> Self {
        let mut state = state.clone();
        for ch in &mut state.channels {
            // Keep the documented invariant that modes are 0-5.
            if ch.mode > 5 {
                ch.mode &= 3;
            }
        }
        Self { state }
    }

    /// The full register state, for state transfer.
    pub fn state(&self) -> PitState {
        self.state.clone()
    }

    /// Whether the next access to `port` (a read, or a write if `is_write`)
    /// needs `now_ns`. When it returns false the caller may pass any value
    /// (0, say): the access will not look at it. The answer holds for the
    /// next access only, since it depends on the timer's state.
    pub fn uses_clock(&self, port: u16, is_write: bool) -> bool {
        match (port, is_write) {
            (CHANNEL0..=CHANNEL2, false) => {
                self.state.channels[usize::from(port - CHANNEL0)].read_uses_clock()
            }
            (CHANNEL0..=CHANNEL2, true) => {
                self.state.channels[usize::from(port - CHANNEL0)].write_completes_reload()
            }
            // The command value is not known yet: a latch or read-back needs
            // the time if it may latch from a counting channel.
            (COMMAND, true) => self.state.channels.iter().any(|c| c.load_ns.is_some()),
            (PORT_61, false) => self.state.channels[2].load_ns.is_some(),
            _ => false,
        }
    }

    /// Handles a guest read of a PIT port or port 0x61. `now_ns` is only
    /// looked at when [`Pit::uses_clock`] said so. The command port and
    /// other ports read 0xff.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            CHANNEL0..=CHANNEL2 => self.state.channels[usize::from(port - CHANNEL0)].read(now_ns),
            PORT_61 => {
                let ch2 = &self.state.channels[2];
                let out2 = if ch2.load_ns.is_some() && ch2.out(now_ns) {
                    PORT_61_OUT2
                } else {
                    0
                };
                self.state.port61 | out2
            }
            _ => 0xff,
        }
    }

    /// Handles a guest write to a PIT port or port 0x61. Any value is
    /// accepted; other ports are ignored. `now_ns` is only looked at when
    /// [`Pit::uses_clock`] said so.
    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            CHANNEL0..=CHANNEL2 => {
                self.state.channels[usize::from(port - CHANNEL0)].write(value, now_ns)
            }
            COMMAND => self.command(value, now_ns),
            PORT_61 => self.state.port61 = value & PORT_61_WRITABLE,
            _ => {}
        }
    }

    fn command(&mut self, value: u8, now_ns: u64) {
        match Command::decode(value) {
            Command::Latch(channel) => self.state.channels[channel].latch_count(now_ns),
            Command::ReadBack {
                mask,
                count,
                status,
            } => {
                for (i, ch) in self.state.channels.iter_mut().enumerate() {
                    if mask & (1 << i) == 0 {
                        continue;
                    }
                    if status && ch.status.is_none() {
                        ch.status = Some(ch.status_byte(now_ns));
                    }
                    if count {
                        ch.latch_count(now_ns);
                    }
                }
            }
            Command::Mode {
                channel,
                access,
                mode,
                bcd,
            } => self.state.channels[channel].set_mode(access, mode, bcd),
        }
    }

    /// The period of channel 0's output in nanoseconds (rounded to nearest)
    /// when it runs periodically: mode 2 or 3 with a reload value written.
    /// The VMM schedules IRQ0 at this rate; `None` means no periodic ticks
    /// (not programmed, or a one-shot mode).
    pub fn channel0_period_ns(&self) -> Option<u64> {
        let ch = &self.state.channels[0];
        if !matches!(ch.mode, 2 | 3) || ch.load_ns.is_none() {
            return None;
        }
        Some((ch.divisor() * NS_PER_SEC + PIT_HZ / 2) / PIT_HZ)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Programs channel 0 as Linux does for HZ=1000: mode 2, word access.
    fn at_1000_hz(now_ns: u64) -> Pit {
        let mut pit = Pit::new();
        pit.write(COMMAND, 0x34, 0);
        assert!(!pit.uses_clock(CHANNEL0, true), "first byte of a word");
        pit.write(CHANNEL0, (1193 & 0xff) as u8, 0);
        assert!(pit.uses_clock(CHANNEL0, true), "second byte reloads");
        pit.write(CHANNEL0, (1193 >> 8) as u8, now_ns);
        pit
    }

    #[test]
    fn thousand_hz_period() {
        let pit = at_1000_hz(0);
        // 1193 counts at 1 193 182 Hz: 999 847.47 ns, i.e. 1000.15 Hz.
        assert_eq!(pit.channel0_period_ns(), Some(999_847));
        assert_eq!(pit.state().channels[0].reload, 1193);
    }

    #[test]
    fn reload_zero_means_65536() {
        let mut pit = Pit::new();
        pit.write(COMMAND, 0x34, 0);
        pit.write(CHANNEL0, 0, 0);
        pit.write(CHANNEL0, 0, 0);
        // 65536 / 1 193 182 s = 54 925 401.15 ns.
        assert_eq!(pit.channel0_period_ns(), Some(54_925_401));
        assert_eq!(pit.read(CHANNEL0, 0), 0);
        assert_eq!(pit.read(CHANNEL0, 0), 0);
        // One tick later: 0xffff.
        assert_eq!(pit.read(CHANNEL0, 839), 0xff);
        assert_eq!(pit.read(CHANNEL0, 839), 0xff);
    }

    #[test]
    fn count_decreases_with_time() {
        let pit_at = |now| {
            let mut pit = at_1000_hz(1_000_000);
            let lo = pit.read(CHANNEL0, now);
            let hi = pit.read(CHANNEL0, now);
            u16::from_le_bytes([lo, hi])
        };
        assert_eq!(pit_at(1_000_000), 1193);
        // 500 us = 596.59 ticks.
        assert_eq!(pit_at(1_500_000), 1193 - 596);
        // Mode 2 reloads: one full period (999 847.47 ns) later it is back
        // at the top.
        assert_eq!(pit_at(1_000_000 + 999_847), 1);
        assert_eq!(pit_at(1_000_000 + 999_848), 1193);
        assert!(pit_at(1_100_000) > pit_at(1_200_000));
        // A clock before the load time does not panic.
        assert_eq!(pit_at(0), 1193);
    }

    #[test]
    fn lobyte_and_hibyte_sequencing() {
        let mut pit = Pit::new();
        // Channel 2, low byte only, mode 0.
        pit.write(COMMAND, 0x90, 0);
        assert!(pit.uses_clock(CHANNEL2, true));
        pit.write(CHANNEL2, 0x34, 0);
        assert_eq!(pit.state().channels[2].reload, 0x0034);
        assert_eq!(pit.read(CHANNEL2, 0), 0x34);
        assert_eq!(pit.read(CHANNEL2, 0), 0x34, "no flip-flop");
        // High byte only.
        pit.write(COMMAND, 0xa0, 0);
        pit.write(CHANNEL2, 0x12, 0);
        assert_eq!(pit.state().channels[2].reload, 0x1200);
        assert_eq!(pit.read(CHANNEL2, 0), 0x12);
        // Word: low then high, for writes and reads.
        pit.write(COMMAND, 0xb0, 0);
        pit.write(CHANNEL2, 0x78, 0);
        assert_eq!(pit.state().channels[2].write_lo, Some(0x78));
        pit.write(CHANNEL2, 0x56, 0);
        assert_eq!(pit.state().channels[2].reload, 0x5678);
        assert_eq!(pit.read(CHANNEL2, 0), 0x78);
        assert_eq!(pit.read(CHANNEL2, 0), 0x56);
        assert_eq!(pit.read(CHANNEL2, 0), 0x78);
        // A mode command resets the flip-flop.
        pit.write(COMMAND, 0xb0, 0);
        assert_eq!(pit.read(CHANNEL2, 0), 0x78);
    }

    #[test]
    fn latch_freezes_the_value() {
        let mut pit = at_1000_hz(0);
        assert!(pit.uses_clock(COMMAND, true));
        pit.write(COMMAND, 0x00, 100_000); // latch channel 0
        assert!(!pit.uses_clock(CHANNEL0, false));
        let lo = pit.read(CHANNEL0, 900_000);
        assert!(!pit.uses_clock(CHANNEL0, false));
        let hi = pit.read(CHANNEL0, 950_000);
        // 100 us = 119.3 ticks.
        assert_eq!(u16::from_le_bytes([lo, hi]), 1193 - 119);
        // Latch released: reads are live again.
        assert!(pit.uses_clock(CHANNEL0, false));
        let lo = pit.read(CHANNEL0, 200_000);
        let hi = pit.read(CHANNEL0, 200_000);
        assert_eq!(u16::from_le_bytes([lo, hi]), 1193 - 238);
    }

    #[test]
    fn second_latch_does_not_overwrite() {
        let mut pit = at_1000_hz(0);
        pit.write(COMMAND, 0x00, 100_000);
        pit.write(COMMAND, 0x00, 500_000);
        let lo = pit.read(CHANNEL0, 0);
        let hi = pit.read(CHANNEL0, 0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 1193 - 119);
    }

    #[test]
    fn read_back_count_and_status() {
        let mut pit = at_1000_hz(0);
        // Read-back, latch count and status of channel 0.
        pit.write(COMMAND, 0xc2, 100_000);
        // Status first: OUT high, not null, word access, mode 2, binary.
        assert_eq!(pit.read(CHANNEL0, 0), 0x80 | 0x30 | (2 << 1));
        let lo = pit.read(CHANNEL0, 0);
        let hi = pit.read(CHANNEL0, 0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 1193 - 119);
        // Count only (bit 4 set: no status).
        pit.write(COMMAND, 0xd2, 200_000);
        let lo = pit.read(CHANNEL0, 0);
        let hi = pit.read(CHANNEL0, 0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 1193 - 238);
        // Status of an unloaded channel 1: null count, OUT low in mode 0.
        pit.write(COMMAND, 0x70 & !0x0e, 0);
        pit.write(COMMAND, 0xe4, 0);
        assert_eq!(pit.read(CHANNEL1, 0), 0x40 | 0x30);
    }

    #[test]
    fn mode0_is_one_shot() {
        let mut pit = Pit::new();
        pit.write(COMMAND, 0x30, 0);
        pit.write(CHANNEL0, 100, 0);
        pit.write(CHANNEL0, 0, 1_000);
        assert_eq!(pit.channel0_period_ns(), None);
        // Mode 0 wraps through 0xffff after terminal count.
        let now = 1_000 + 101 * NS_PER_SEC / PIT_HZ + 1;
        let lo = pit.read(CHANNEL0, now);
        let hi = pit.read(CHANNEL0, now);
        assert_eq!(u16::from_le_bytes([lo, hi]), 0xffff);
    }

    #[test]
    fn unprogrammed_and_mode_changes_have_no_period() {
        let mut pit = Pit::new();
        assert_eq!(pit.channel0_period_ns(), None);
        pit.write(COMMAND, 0x36, 0); // mode 3, no reload yet
        assert_eq!(pit.channel0_period_ns(), None);
        pit.write(CHANNEL0, 0x9c, 0);
        pit.write(CHANNEL0, 0x2e, 0);
        assert_eq!(pit.channel0_period_ns(), Some(10_000_151));
        // Mode 7 is an alias of mode 3.
        pit.write(COMMAND, 0x3e, 0);
        pit.write(CHANNEL0, 0x9c, 0);
        pit.write(CHANNEL0, 0x2e, 0);
        assert_eq!(pit.state().channels[0].mode, 3);
        assert_eq!(pit.channel0_period_ns(), Some(10_000_151));
        // Channel 2 does not drive IRQ0.
        pit.write(COMMAND, 0x30, 0);
        pit.write(COMMAND, 0xb4, 0);
        pit.write(CHANNEL2, 1, 0);
        pit.write(CHANNEL2, 1, 0);
        assert_eq!(pit.channel0_period_ns(), None);
    }

    #[test]
    fn port_61_round_trip_and_out2() {
        let mut pit = Pit::new();
        assert!(!pit.uses_clock(PORT_61, false));
        assert!(!pit.uses_clock(PORT_61, true));
        pit.write(PORT_61, 0xff, 0);
        assert_eq!(pit.read(PORT_61, 0), 0x0f);
        pit.write(PORT_61, 0x01, 0);
        assert_eq!(pit.read(PORT_61, 0), 0x01);
        // Linux TSC calibration: channel 2, mode 0, wait for OUT2.
        pit.write(COMMAND, 0xb0, 0);
        pit.write(CHANNEL2, 0xff, 0);
        pit.write(CHANNEL2, 0xff, 0);
        assert!(pit.uses_clock(PORT_61, false));
        assert_eq!(pit.read(PORT_61, 1_000), 0x01);
        assert_eq!(pit.read(PORT_61, 60_000_000), 0x21);
    }

    #[test]
    fn mode3_square_wave() {
        let mut pit = Pit::new();
        pit.write(COMMAND, 0x16, 0); // channel 0, low byte, mode 3
        pit.write(CHANNEL0, 10, 0);
        let tick = |n: u64| n * NS_PER_SEC / PIT_HZ + 1;
        let mut st = pit.state().channels[0].clone();
        assert_eq!(st.count(tick(0)), 10);
        assert_eq!(st.count(tick(1)), 8);
        assert_eq!(st.count(tick(5)), 10);
        assert!(st.out(tick(4)));
        assert!(!st.out(tick(5)));
        assert!(st.out(tick(10)));
        st.mode = 2;
        assert_eq!(st.count(tick(9)), 1);
        assert!(!st.out(tick(9)));
        assert!(st.out(tick(10)));
    }

    #[test]
    fn bcd_is_accepted() {
        let mut pit = Pit::new();
        pit.write(COMMAND, 0x35, 0); // mode 2, BCD
        pit.write(CHANNEL0, 0x99, 0);
        pit.write(CHANNEL0, 0x99, 0);
        assert!(pit.state().channels[0].bcd);
        assert!(pit.channel0_period_ns().is_some());
    }

    #[test]
    fn state_round_trip() {
        let mut pit = at_1000_hz(5);
        pit.write(COMMAND, 0x00, 10);
        pit.write(PORT_61, 3, 0);
        let bytes = postcard::to_stdvec(&pit.state()).unwrap();
        let mut copy = Pit::from_state(&postcard::from_bytes(&bytes).unwrap());
        assert_eq!(copy.state(), pit.state());
        // It keeps counting from the same load time.
        assert_eq!(copy.channel0_period_ns(), pit.channel0_period_ns());
        assert_eq!(
            copy.read(CHANNEL0, 1_234_567),
            pit.read(CHANNEL0, 1_234_567)
        );
    }

    /// The contract with the caller: when `uses_clock` is false the access
    /// must not depend on `now_ns`. Also checks that nothing panics.
    #[test]
    fn accesses_without_clock_ignore_now() {
        let ports = [CHANNEL0, CHANNEL1, CHANNEL2, COMMAND, PORT_61, 0x44];
        let mut pit = Pit::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut now = 0u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += x % 5_000;
            let port = ports[(x >> 20) as usize % ports.len()];
            let is_write = x & 1 == 0;
            let value = (x >> 40) as u8;
            let needs = pit.uses_clock(port, is_write);
            if needs {
                if is_write {
                    pit.write(port, value, now);
                } else {
                    pit.read(port, now);
                }
                continue;
            }
            let mut other = pit.clone();
            if is_write {
                pit.write(port, value, now);
                other.write(port, value, u64::MAX - now);
            } else {
                let a = pit.read(port, now);
                let b = other.read(port, u64::MAX - now);
                assert_eq!(a, b, "port {port:#x} read");
            }
            assert_eq!(
                pit.state(),
                other.state(),
                "port {port:#x} write {value:#x}"
            );
            pit.channel0_period_ns();
        }
    }
}
