//! The failover timeline chart of `duet demo`: client throughput and reply
//! latency over time, with the moments that make up a failover marked on
//! both (the SIGKILL, the backup noticing, its claim, the grant, going
//! live, and, when a spare joins the survivor, the moment it is protected
//! again), drawn with plotters as SVG and PNG.
//!
//! The marks of a fast failover lie within a few milliseconds of each
//! other, closer than a pixel on a chart several seconds wide, so their
//! labels are stacked and each carries its offset from the kill: the
//! picture shows where the failover is, the labels how long each step took.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Errors drawing the chart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nothing to draw: the client saw no replies")]
    Empty,
    #[error("cannot draw {path}: {message}")]
    Draw { path: String, message: String },
}

/// A moment on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Seconds since the run started.
    pub t: f64,
    /// Short name: "kill", "detected", "claim", "granted", "go-live",
    /// "protected".
    pub label: String,
}

/// What the chart shows.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub title: String,
    /// Every reply the client got: (seconds since start, latency in ms).
    pub replies: Vec<(f64, f64)>,
    /// In time order; the first is the kill, the others are given as
    /// offsets from it.
    pub marks: Vec<Mark>,
}

/// Width of a throughput bin.
const BIN_S: f64 = 0.1;

impl Timeline {
    /// Replies per second in bins of [`BIN_S`], as (bin centre, rate).
    pub fn throughput(&self) -> Vec<(f64, f64)> {
        let end = self.end();
        let bins = (end / BIN_S).ceil().max(1.0) as usize;
        let mut counts = vec![0u64; bins];
        for &(t, _) in &self.replies {
            let i = ((t / BIN_S) as usize).min(bins - 1);
            counts[i] += 1;
        }
        counts
            .iter()
            .enumerate()
            .map(|(i, &n)| ((i as f64 + 0.5) * BIN_S, n as f64 / BIN_S))
            .collect()
    }

    fn end(&self) -> f64 {
        let last_reply = self.replies.iter().map(|r| r.0).fold(0.0, f64::max);
        let last_mark = self.marks.iter().map(|m| m.t).fold(0.0, f64::max);
        last_reply.max(last_mark).max(BIN_S)
    }

    /// The longest time between two consecutive replies, and when it began.
    pub fn longest_gap(&self) -> Option<(f64, f64)> {
        let mut ts: Vec<f64> = self.replies.iter().map(|r| r.0).collect();
        ts.sort_by(f64::total_cmp);
        ts.windows(2)
            .map(|w| (w[1] - w[0], w[0]))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// Writes the chart to `svg` and `png`.
pub fn write(timeline: &Timeline, svg: &Path, png: &Path) -> Result<(), Error> {
    if timeline.replies.is_empty() {
        return Err(Error::Empty);
    }
    let size = (1200, 720);
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |e: String| Error::Draw {
            path: path.clone(),
            message: e,
        }
    };
    draw(SVGBackend::new(svg, size).into_drawing_area(), timeline).map_err(fail(svg))?;
    draw(BitMapBackend::new(png, size).into_drawing_area(), timeline).map_err(fail(png))?;
    Ok(())
}

/// The colour of a mark, by its position in the failover.
fn mark_colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(200, 30, 30),
        RGBColor(230, 130, 0),
        RGBColor(120, 60, 180),
        RGBColor(30, 120, 200),
        RGBColor(20, 150, 60),
        RGBColor(90, 90, 90),
    ];
    COLOURS[i % COLOURS.len()]
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, tl: &Timeline) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(&tl.title, ("sans-serif", 24)).map_err(e)?;
    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
    let end = tl.end() * 1.02;
    let rates = tl.throughput();
    let max_rate = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.25;

    let mut up = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..max_rate)
        .map_err(e)?;
    up.configure_mesh()
        .y_desc("client replies/s")
        .x_desc("seconds")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    up.draw_series(LineSeries::new(rates.iter().copied(), BLUE.stroke_width(2)))
        .map_err(e)?;

    let max_lat = tl.replies.iter().map(|r| r.1).fold(1.0, f64::max) * 2.0;
    let mut low = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, (0.05..max_lat).log_scale())
        .map_err(e)?;
    low.configure_mesh()
        .y_desc("reply latency, ms (log)")
        .x_desc("seconds since the start")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    low.draw_series(
        tl.replies
            .iter()
            .map(|&(t, ms)| Circle::new((t, ms.max(0.05)), 2, BLACK.mix(0.5).filled())),
    )
    .map_err(e)?;

    let kill = tl.marks.first().map_or(0.0, |m| m.t);
    for (i, m) in tl.marks.iter().enumerate() {
        let c = mark_colour(i);
        up.draw_series(LineSeries::new(
            [(m.t, 0.0), (m.t, max_rate)],
            c.stroke_width(1),
        ))
        .map_err(e)?;
        low.draw_series(LineSeries::new(
            [(m.t, 0.05), (m.t, max_lat)],
            c.stroke_width(1),
        ))
        .map_err(e)?;
        let text = if i == 0 {
            m.label.clone()
        } else {
            format!("{} +{:.0} ms", m.label, (m.t - kill) * 1e3)
        };
        // Stacked from the top, one line each, just right of the line.
        let y = max_rate * (0.96 - 0.075 * i as f64);
        up.draw_series(std::iter::once(Text::new(
            text,
            (m.t + end * 0.006, y),
            ("sans-serif", 15).into_font().color(&c),
        )))
        .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline() -> Timeline {
        let mut replies = Vec::new();
        for i in 0..300 {
            let t = i as f64 * 0.01;
            if !(1.5..1.7).contains(&t) {
                replies.push((t, if t > 1.69 && t < 1.75 { 190.0 } else { 0.8 }));
            }
        }
        Timeline {
            title: "test".into(),
            replies,
            marks: vec![
                Mark {
                    t: 1.5,
                    label: "kill".into(),
                },
                Mark {
                    t: 1.503,
                    label: "detected".into(),
                },
                Mark {
                    t: 1.51,
                    label: "go-live".into(),
                },
            ],
        }
    }

    #[test]
    fn throughput_and_the_longest_gap() {
        let tl = timeline();
        let rates = tl.throughput();
        assert!((rates[0].1 - 100.0).abs() < 1e-9, "{rates:?}");
        let (gap, at) = tl.longest_gap().unwrap();
        assert!((gap - 0.2).abs() < 0.011, "{gap}");
        assert!((at - 1.49).abs() < 0.011, "{at}");
    }

    #[test]
    fn writes_svg_and_png_with_the_marks_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (svg, png) = (dir.path().join("c.svg"), dir.path().join("c.png"));
        write(&timeline(), &svg, &png).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        let at = |s: &str| {
            text.find(&format!(">\n{s}\n</text>"))
                .unwrap_or_else(|| panic!("no label {s:?} in the SVG"))
        };
        assert!(at("kill") < at("detected +3 ms"));
        assert!(at("detected +3 ms") < at("go-live +10 ms"));
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(write(&Timeline::default(), &svg, &png).is_err());
    }
}
