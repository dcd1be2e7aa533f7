//! The CMOS real-time clock (ports 0x70/0x71): wall-clock time, which the
//! VMM takes through its timeline like every other outside value.

use crate::port::{inb, outb};

/// A wall-clock reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

fn cmos(register: u8) -> u8 {
    outb(0x70, register);
    inb(0x71)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

fn read_raw() -> [u8; 7] {
    // Status A bit 7: an update is in progress and the registers may be torn.
    while cmos(0x0a) & 0x80 != 0 {}
    [
        cmos(0x00),
        cmos(0x02),
        cmos(0x04),
        cmos(0x07),
        cmos(0x08),
        cmos(0x09),
        cmos(0x32),
    ]
}

/// Reads the RTC, honouring status register B (BCD or binary, 12 or 24 h).
pub fn now() -> DateTime {
    // Read until two reads agree, so no update happened in between.
    let mut raw = read_raw();
    loop {
        let again = read_raw();
        if again == raw {
            break;
        }
        raw = again;
    }
    let status_b = cmos(0x0b);
    let binary = status_b & 0x04 != 0;
    let hours_24 = status_b & 0x02 != 0;
    let conv = |v: u8| if binary { v } else { from_bcd(v) };

    let pm = raw[2] & 0x80 != 0;
    let mut hour = conv(raw[2] & 0x7f);
    if !hours_24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = match conv(raw[6]) {
        c @ 19..=21 => u16::from(c),
        _ => 20,
    };
    DateTime {
        year: century * 100 + u16::from(conv(raw[5])),
        month: conv(raw[4]),
        day: conv(raw[3]),
        hour,
        minute: conv(raw[1]),
        second: conv(raw[0]),
    }
}
