//! The MC146818 CMOS real-time clock: index port 0x70, data port 0x71, 128
//! bytes of CMOS RAM.
//!
//! The wall clock is an input from the outside world, so the model never
//! reads it: the caller asks [`Rtc::wants_wall_clock`] before each access and
//! passes the Unix time (taken through the timeline, so that it is logged)
//! only when asked. The time registers are computed from that wall clock plus
//! an offset in seconds, which is the only clock state the model keeps: a
//! guest that sets the time moves the offset, and later reads follow.
//!
//! Time registers: 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 weekday
//! (1 = Sunday), 0x07 day of month, 0x08 month, 0x09 year (two digits),
//! 0x32 century. Status B selects BCD or binary (DM, bit 2) and 24- or
//! 12-hour mode (bit 1; in 12-hour mode bit 7 of the hour means PM), and
//! its SET bit (bit 7) freezes the time registers so the guest can write a
//! whole date consistently: while SET is 1 time registers are plain RAM,
//! and clearing SET starts the clock from what was written. Without SET a
//! write to one time register moves the clock at once, with the other
//! fields taken from the current time (a day that does not exist in the
//! current month rolls over into the next).
//!
//! Status A reads with UIP always 0 (the update cycle is instantaneous
//! here), status C reads 0 and clears, status D reads 0x80 (valid RAM and
//! time). The RTC interrupt (IRQ8: periodic, alarm, update-ended) is not
//! modelled; the alarm registers are plain RAM. Daylight saving is ignored.

/// I/O port of the index register (bit 7 is NMI disable and is masked off).
pub const INDEX_PORT: u16 = 0x70;
/// I/O port of the data register for the selected CMOS byte.
pub const DATA_PORT: u16 = 0x71;

/// Size of CMOS RAM, including the clock and status registers.
pub const CMOS_SIZE: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Every register that holds part of the current time.
const TIME_REGISTERS: [u8; 8] = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY];

/// Status A: update in progress (read-only, always 0 here).
const A_UIP: u8 = 0x80;
/// Status A at power-on: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Status B: updates inhibited, time registers writable as a set.
const B_SET: u8 = 0x80;
/// Status B: binary (set) or BCD (clear) data mode.
const B_BINARY: u8 = 0x04;
/// Status B: 24-hour (set) or 12-hour (clear) mode.
const B_24H: u8 = 0x02;
/// Status B at power-on: 24-hour, BCD.
const B_DEFAULT: u8 = B_24H;
/// Status D: valid RAM and time.
const D_VRT: u8 = 0x80;
/// The 12-hour mode PM flag in the hours register.
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// The clock's state, as moved by state transfer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    /// The selected CMOS byte (0-127).
    pub index: u8,
    /// CMOS RAM. Time registers hold meaningful values only while status B's
    /// SET bit is on; otherwise they are computed.
    #[serde(with = "cmos_bytes")]
    pub ram: [u8; CMOS_SIZE],
    /// Guest time minus wall-clock time, in seconds.
    pub offset_secs: i64,
    /// Weekday the guest set minus the weekday of the date, modulo 7.
    pub weekday_adjust: u8,
}

/// CMOS RAM as one byte string: serde's derives stop at 32-element arrays.
/// A string of another length is refused, not padded.
mod cmos_bytes {
    use super::CMOS_SIZE;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ram: &[u8; CMOS_SIZE], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(ram)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; CMOS_SIZE], D::Error> {
        struct Ram;
        impl<'de> Visitor<'de> for Ram {
            type Value = [u8; CMOS_SIZE];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "{CMOS_SIZE} bytes of CMOS RAM")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut ram = [0u8; CMOS_SIZE];
                for (i, b) in ram.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(A::Error::invalid_length(CMOS_SIZE + 1, &self));
                }
                Ok(ram)
            }
        }
        d.deserialize_bytes(Ram)
    }
}

impl Default for RtcState {
    fn default() -> Self {
        let mut ram = [0; CMOS_SIZE];
        ram[usize::from(STATUS_A)] = A_DEFAULT;
        ram[usize::from(STATUS_B)] = B_DEFAULT;
        ram[usize::from(STATUS_D)] = D_VRT;
        Self {
            index: 0,
            ram,
            offset_secs: 0,
            weekday_adjust: 0,
        }
    }
}

/// A broken-down time, binary, 24-hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    sec: i64,
    min: i64,
    hour: i64,
    /// 1 = Sunday.
    weekday: i64,
    day: i64,
    month: i64,
    /// Full year, e.g. 2023.
    year: i64,
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) in the proleptic
/// Gregorian calendar. Works on 400-year eras of 146 097 days, counting
/// years from March so that the leap day falls at the end.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    // Shift the epoch to 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097; // 0..=146_096
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`]. Months outside 1-12 carry into the
/// year and days outside the month carry into the next ones, so any
/// guest-written values give some instant.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = year + (month - 1).div_euclid(12);
    let month = (month - 1).rem_euclid(12) + 1;
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let march_month = (month + 9) % 12;
    let day_of_year = (153 * march_month + 2) / 5;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468 + (day - 1)
}

impl Fields {
    fn at(unix: i64, weekday_adjust: u8) -> Self {
        let days = unix.div_euclid(SECS_PER_DAY);
        let secs = unix.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (weekday 5 with 1 = Sunday).
        let weekday = (days + 4 + i64::from(weekday_adjust)).rem_euclid(7) + 1;
        Self {
            sec: secs % 60,
            min: secs / 60 % 60,
            hour: secs / 3600,
            weekday,
            day,
            month,
            year,
        }
    }

    /// The Unix time of these fields. Saturates: guest-written fields at the
    /// far end of the range must not overflow.
    fn unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day)
            .saturating_mul(SECS_PER_DAY)
            .saturating_add(self.hour * 3600 + self.min * 60 + self.sec)
    }

    /// The binary value of a time register.
    fn get(&self, reg: u8) -> i64 {
        match reg {
            SECONDS => self.sec,
            MINUTES => self.min,
            HOURS => self.hour,
            WEEKDAY => self.weekday,
            DAY => self.day,
            MONTH => self.month,
            YEAR => self.year.rem_euclid(100),
            _ => self.year.div_euclid(100).rem_euclid(100),
        }
    }

    /// Sets a time register from its binary value.
    fn set(&mut self, reg: u8, value: i64) {
        match reg {
            SECONDS => self.sec = value,
            MINUTES => self.min = value,
            HOURS => self.hour = value,
            WEEKDAY => self.weekday = value,
            DAY => self.day = value,
            MONTH => self.month = value,
            YEAR => self.year = self.year.div_euclid(100) * 100 + value,
            _ => self.year = value * 100 + self.year.rem_euclid(100),
        }
    }
}

/// Converts a binary register value (0-99) to the format in status B.
fn encode(reg: u8, value: i64, status_b: u8) -> u8 {
    let to_format = |v: i64| -> u8 {
        let v = v.rem_euclid(100) as u8;
        if status_b & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    };
    if reg == HOURS && status_b & B_24H == 0 {
        let pm = if value >= 12 { HOUR_PM } else { 0 };
        let h12 = match value % 12 {
            0 => 12,
            h => h,
        };
        to_format(h12) | pm
    } else {
        to_format(value)
    }
}

/// Converts a guest-written register value in the format of status B to
/// binary. Invalid BCD digits are taken at face value (0xff is 165).
fn decode(reg: u8, byte: u8, status_b: u8) -> i64 {
    let from_format = |b: u8| -> i64 {
        if status_b & B_BINARY != 0 {
            i64::from(b)
        } else {
            i64::from(b >> 4) * 10 + i64::from(b & 0xf)
        }
    };
    if reg == HOURS && status_b & B_24H == 0 {
        let h = from_format(byte & !HOUR_PM) % 12;
        if byte & HOUR_PM != 0 {
            h + 12
        } else {
            h
        }
    } else {
        from_format(byte)
    }
}

fn is_time_register(reg: u8) -> bool {
    TIME_REGISTERS.contains(&reg)
}

/// The CMOS RTC and its RAM.
#[derive(Clone, Debug, Default)]
pub struct Rtc {
    state: RtcState,
}

impl Rtc {
    /// A clock at power-on: BCD, 24-hour, following the wall clock exactly.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a clock from a state taken with [`Rtc::state`].
    pub fn from_state(state: &RtcState) -> Self {
        let mut state = state.clone();
        state.index &= 0x7f;
        state.weekday_adjust %= 7;
        Self { state }
    }

    /// The full state, for state transfer.
    pub fn state(&self) -> RtcState {
        self.state.clone()
    }

    fn status_b(&self) -> u8 {
        self.state.ram[usize::from(STATUS_B)]
    }

    fn frozen(&self) -> bool {
        self.status_b() & B_SET != 0
    }

    /// Whether the next access to `port` (a read, or a write if `is_write`)
    /// needs the wall clock: a data-port access to a time register while the
    /// clock runs, or a data-port write to status B (which may set or clear
    /// SET). The answer holds for the next access only.
    pub fn wants_wall_clock(&self, port: u16, is_write: bool) -> bool {
        if port != DATA_PORT {
            return false;
        }
        let index = self.state.index;
        (is_time_register(index) && !self.frozen()) || (is_write && index == STATUS_B)
    }

    fn fields_now(&self, wall: i64) -> Fields {
        Fields::at(
            wall.saturating_add(self.state.offset_secs),
            self.state.weekday_adjust,
        )
    }

    /// Makes `fields` the current guest time.
    fn set_time(&mut self, fields: &Fields, wall: i64) {
        let plain = Fields::at(fields.unix(), 0);
        self.state.weekday_adjust = (fields.weekday - plain.weekday).rem_euclid(7) as u8;
        self.state.offset_secs = fields.unix().saturating_sub(wall);
    }

    /// Handles a guest read. `wall_unix_secs` is the wall clock, needed only
    /// when [`Rtc::wants_wall_clock`] said so; if it is missing then, the
    /// Unix epoch is used. The index port reads 0xff, as do other ports.
    pub fn read(&mut self, port: u16, wall_unix_secs: Option<i64>) -> u8 {
        if port != DATA_PORT {
            return 0xff;
        }
        let index = self.state.index;
        match index {
            STATUS_A => self.state.ram[usize::from(STATUS_A)] & !A_UIP,
            STATUS_C => std::mem::take(&mut self.state.ram[usize::from(STATUS_C)]),
            STATUS_D => D_VRT,
            reg if is_time_register(reg) && !self.frozen() => {
                let fields = self.fields_now(wall_unix_secs.unwrap_or(0));
                encode(reg, fields.get(reg), self.status_b())
            }
            _ => self.state.ram[usize::from(index)],
        }
    }

    /// Handles a guest write. Any value is accepted; other ports are
    /// ignored. `wall_unix_secs` is needed only when
    /// [`Rtc::wants_wall_clock`] said so; if it is missing then, the Unix
    /// epoch is used.
    pub fn write(&mut self, port: u16, value: u8, wall_unix_secs: Option<i64>) {
        match port {
            INDEX_PORT => self.state.index = value & 0x7f,
            DATA_PORT => self.write_data(value, wall_unix_secs.unwrap_or(0)),
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8, wall: i64) {
        let index = self.state.index;
        match index {
            STATUS_A => self.state.ram[usize::from(STATUS_A)] = value & !A_UIP,
            STATUS_B => self.write_status_b(value, wall),
            STATUS_C | STATUS_D => {}
            reg if is_time_register(reg) && !self.frozen() => {
                let mut fields = self.fields_now(wall);
                fields.set(reg, decode(reg, value, self.status_b()));
                self.set_time(&fields, wall);
            }
            _ => self.state.ram[usize::from(index)] = value,
        }
    }

    fn write_status_b(&mut self, value: u8, wall: i64) {
        let old = self.status_b();
        if old & B_SET == 0 && value & B_SET != 0 {
            // Freeze: the time registers keep the current time, in the new
            // format, and become plain RAM.
            let fields = self.fields_now(wall);
            for reg in TIME_REGISTERS {
                self.state.ram[usize::from(reg)] = encode(reg, fields.get(reg), value);
            }
        } else if old & B_SET != 0 && value & B_SET == 0 {
            // Run again from what the guest wrote (in the format it was
            // written in).
            let mut fields = self.fields_now(wall);
            for reg in TIME_REGISTERS {
                let byte = self.state.ram[usize::from(reg)];
                fields.set(reg, decode(reg, byte, old));
            }
            self.set_time(&fields, wall);
        }
        self.state.ram[usize::from(STATUS_B)] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14 22:13:20 UTC, a Tuesday.
    const T: i64 = 1_700_000_000;

    fn read_reg(rtc: &mut Rtc, reg: u8, wall: i64) -> u8 {
        rtc.write(INDEX_PORT, reg, None);
        let w = rtc.wants_wall_clock(DATA_PORT, false).then_some(wall);
        rtc.read(DATA_PORT, w)
    }

    fn write_reg(rtc: &mut Rtc, reg: u8, value: u8, wall: i64) {
        rtc.write(INDEX_PORT, reg, None);
        let w = rtc.wants_wall_clock(DATA_PORT, true).then_some(wall);
        rtc.write(DATA_PORT, value, w);
    }

    /// Seconds, minutes, hours, weekday, day, month, year, century.
    fn time_regs(rtc: &mut Rtc, wall: i64) -> [u8; 8] {
        TIME_REGISTERS.map(|reg| read_reg(rtc, reg, wall))
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(T / SECS_PER_DAY), (2023, 11, 14));
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        // Out-of-range months and days carry.
        assert_eq!(days_from_civil(2023, 13, 1), days_from_civil(2024, 1, 1));
        assert_eq!(days_from_civil(2023, 0, 1), days_from_civil(2022, 12, 1));
        assert_eq!(days_from_civil(2023, 2, 29), days_from_civil(2023, 3, 1));
        // Extreme instants do not overflow.
        Fields::at(i64::MAX, 6);
        Fields::at(i64::MIN, 6);
    }

    #[test]
    fn known_time_in_bcd() {
        let mut rtc = Rtc::new();
        assert!(!rtc.wants_wall_clock(INDEX_PORT, true));
        rtc.write(INDEX_PORT, 0x00, None);
        assert!(rtc.wants_wall_clock(DATA_PORT, false));
        assert_eq!(
            time_regs(&mut rtc, T),
            [0x20, 0x13, 0x22, 0x03, 0x14, 0x11, 0x23, 0x20]
        );
    }

    #[test]
    fn known_time_in_binary() {
        let mut rtc = Rtc::new();
        write_reg(&mut rtc, STATUS_B, B_24H | B_BINARY, T);
        assert_eq!(time_regs(&mut rtc, T), [20, 13, 22, 3, 14, 11, 23, 20]);
    }

    #[test]
    fn known_time_in_12_hour_mode() {
        let mut rtc = Rtc::new();
        write_reg(&mut rtc, STATUS_B, 0, T);
        assert_eq!(read_reg(&mut rtc, HOURS, T), 0x80 | 0x10, "10 PM");
        assert_eq!(read_reg(&mut rtc, HOURS, T - 22 * 3600), 0x12, "12 AM");
        assert_eq!(
            read_reg(&mut rtc, HOURS, T - 10 * 3600),
            0x80 | 0x12,
            "12 PM"
        );
        assert_eq!(read_reg(&mut rtc, HOURS, T - 13 * 3600), 0x09, "9 AM");
        write_reg(&mut rtc, STATUS_B, B_BINARY, T);
        assert_eq!(read_reg(&mut rtc, HOURS, T), 0x80 | 10);
    }

    #[test]
    fn century_rollover() {
        let mut rtc = Rtc::new();
        // 2000-01-01 00:00:00, a Saturday.
        assert_eq!(
            time_regs(&mut rtc, 946_684_800),
            [0, 0, 0, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
        assert_eq!(read_reg(&mut rtc, YEAR, 946_684_799), 0x99);
        assert_eq!(read_reg(&mut rtc, CENTURY, 946_684_799), 0x19);
        // 2100-01-01, a Friday; 2100 is not a leap year.
        assert_eq!(
            time_regs(&mut rtc, 4_102_444_800),
            [0, 0, 0, 0x06, 0x01, 0x01, 0x00, 0x21]
        );
        let feb28_2100 = 4_102_444_800 + 58 * SECS_PER_DAY;
        assert_eq!(read_reg(&mut rtc, MONTH, feb28_2100 + SECS_PER_DAY), 0x03);
        // 2000 is a leap year.
        assert_eq!(read_reg(&mut rtc, DAY, 951_782_400), 0x29);
        assert_eq!(read_reg(&mut rtc, MONTH, 951_782_400), 0x02);
    }

    #[test]
    fn guest_sets_time_with_set_bit() {
        let mut rtc = Rtc::new();
        // Linux-style: SET, write every field, clear SET.
        write_reg(&mut rtc, STATUS_B, B_SET | B_24H, T);
        assert!(!rtc.wants_wall_clock(DATA_PORT, false), "frozen");
        rtc.write(INDEX_PORT, SECONDS, None);
        assert!(!rtc.wants_wall_clock(DATA_PORT, true));
        // Frozen registers read the time at SET.
        assert_eq!(read_reg(&mut rtc, MINUTES, T + 100), 0x13);
        // 2024-01-31 08:30:45, a Wednesday, written field by field. The
        // day goes in while the month still says November: frozen fields
        // are not normalised until SET is cleared.
        for (reg, v) in [
            (SECONDS, 0x45),
            (MINUTES, 0x30),
            (HOURS, 0x08),
            (WEEKDAY, 0x04),
            (DAY, 0x31),
            (MONTH, 0x01),
            (YEAR, 0x24),
            (CENTURY, 0x20),
        ] {
            write_reg(&mut rtc, reg, v, T + 5);
        }
        write_reg(&mut rtc, STATUS_B, B_24H, T + 10);
        let state = rtc.state();
        assert_eq!(state.offset_secs, 1_706_689_845 - (T + 10));
        assert_eq!(state.weekday_adjust, 0);
        assert_eq!(
            time_regs(&mut rtc, T + 10),
            [0x45, 0x30, 0x08, 0x04, 0x31, 0x01, 0x24, 0x20]
        );
        // The clock runs on from there.
        assert_eq!(read_reg(&mut rtc, SECONDS, T + 20), 0x55);
        assert_eq!(read_reg(&mut rtc, DAY, T + 10 + 16 * 3600), 0x01);
    }

    #[test]
    fn guest_sets_one_field_without_set_bit() {
        let mut rtc = Rtc::new();
        write_reg(&mut rtc, MINUTES, 0x45, T);
        assert_eq!(rtc.state().offset_secs, 32 * 60);
        assert_eq!(read_reg(&mut rtc, MINUTES, T + 60), 0x46);
        assert_eq!(read_reg(&mut rtc, HOURS, T + 60), 0x22);
        // Weekday writes are kept as an adjustment that follows the days.
        write_reg(&mut rtc, WEEKDAY, 0x01, T);
        assert_eq!(read_reg(&mut rtc, WEEKDAY, T), 0x01);
        assert_eq!(read_reg(&mut rtc, WEEKDAY, T + SECS_PER_DAY), 0x02);
        // 12-hour binary write of 3 PM.
        write_reg(&mut rtc, STATUS_B, B_BINARY, T);
        write_reg(&mut rtc, HOURS, 0x80 | 3, T);
        write_reg(&mut rtc, STATUS_B, B_BINARY | B_24H, T);
        assert_eq!(read_reg(&mut rtc, HOURS, T), 15);
    }

    #[test]
    fn status_registers() {
        let mut rtc = Rtc::new();
        assert_eq!(read_reg(&mut rtc, STATUS_A, T), 0x26);
        write_reg(&mut rtc, STATUS_A, 0xff, T);
        assert_eq!(read_reg(&mut rtc, STATUS_A, T), 0x7f, "UIP reads 0");
        assert_eq!(read_reg(&mut rtc, STATUS_B, T), 0x02);
        assert!(!rtc.wants_wall_clock(DATA_PORT, false));
        assert!(rtc.wants_wall_clock(DATA_PORT, true));
        assert_eq!(read_reg(&mut rtc, STATUS_C, T), 0);
        write_reg(&mut rtc, STATUS_C, 0xff, T);
        assert_eq!(read_reg(&mut rtc, STATUS_C, T), 0);
        let mut state = rtc.state();
        state.ram[usize::from(STATUS_C)] = 0x90;
        let mut rtc = Rtc::from_state(&state);
        assert_eq!(read_reg(&mut rtc, STATUS_C, T), 0x90);
        assert_eq!(read_reg(&mut rtc, STATUS_C, T), 0, "read clears");
        write_reg(&mut rtc, STATUS_D, 0, T);
        assert_eq!(read_reg(&mut rtc, STATUS_D, T), 0x80);
    }

    #[test]
    fn ram_alarms_and_index() {
        let mut rtc = Rtc::new();
        for (reg, v) in [(0x01, 0x11), (0x03, 0x22), (0x05, 0x33), (0x7f, 0x44)] {
            write_reg(&mut rtc, reg, v, T);
            assert!(!rtc.wants_wall_clock(DATA_PORT, false));
            assert_eq!(read_reg(&mut rtc, reg, T), v);
        }
        // NMI-disable bit is masked off the index.
        rtc.write(INDEX_PORT, 0x80 | 0x05, None);
        assert_eq!(rtc.read(DATA_PORT, None), 0x33);
        assert_eq!(rtc.read(INDEX_PORT, None), 0xff);
        assert_eq!(rtc.read(0x72, None), 0xff);
        assert_eq!(rtc.state().index, 0x05);
    }

    #[test]
    fn state_round_trip() {
        let mut rtc = Rtc::new();
        write_reg(&mut rtc, MINUTES, 0x01, T);
        write_reg(&mut rtc, 0x40, 0xaa, T);
        let bytes = postcard::to_stdvec(&rtc.state()).unwrap();
        let mut copy = Rtc::from_state(&postcard::from_bytes(&bytes).unwrap());
        assert_eq!(copy.state(), rtc.state());
        // CMOS RAM of another size is refused, not padded.
        let json = serde_json::to_string(&rtc.state()).unwrap();
        assert!(json.contains(",0],\"offset_secs\""), "{json}");
        assert!(serde_json::from_str::<RtcState>(&json.replace(",0]", "]")).is_err());
        assert_eq!(time_regs(&mut copy, T + 7), time_regs(&mut rtc, T + 7));
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut rtc = Rtc::new();
        let mut x: u64 = 0xdead_beef_cafe_f00d;
        let walls = [0, T, -1, i64::MAX, i64::MIN, 253_402_300_799];
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = [INDEX_PORT, DATA_PORT, DATA_PORT, 0x72][(x >> 8) as usize % 4];
            let value = (x >> 16) as u8;
            let wall = Some(walls[(x >> 32) as usize % walls.len()]);
            if x & 1 == 0 {
                rtc.write(port, value, wall);
            } else {
                rtc.read(port, wall);
            }
        }
    }
}
