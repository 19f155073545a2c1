//! SVG plots of a report: one latency percentile spectrum per histogram
//! (HdrHistogram style: the x axis is 1/(1-percentile) on a log scale, so the
//! tail gets as much room as the median) and the run's timeline
//! (open connections; handshake, send and delivery rates).

use std::path::Path;

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::hist;
use crate::report::Report;

/// Writes `latency-<name>.svg` for every non-empty histogram and `timeline.svg`.
pub fn write_all(report: &Report, dir: &Path) -> Result<()> {
    for (name, text) in &report.histograms {
        let h = hist::decode(text)?;
        if !h.is_empty() {
            let title = format!(
                "{} latency — {} ({} samples)",
                name,
                report.scenario,
                h.len()
            );
            spectrum(&h, &title, &dir.join(format!("latency-{name}.svg")))?;
        }
    }
    timeline(report, &dir.join("timeline.svg"))
}

fn err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

/// `x = 1/(1-p)` back to a percentile label: 1 → 0%, 10 → 90%, 1000 → 99.9%.
fn percentile_label(x: f64) -> String {
    let p = (1.0 - 1.0 / x) * 100.0;
    if p < 99.0 {
        format!("{p:.0}%")
    } else {
        // As many decimals as there are nines after the point.
        let decimals = ((x.log10().round() as i32) - 2).max(0) as usize;
        format!("{p:.decimals$}%")
    }
}

/// The (1/(1-p), latency ms) points of a histogram, capped at `max_x`.
fn spectrum_points(h: &Histogram<u64>, max_x: f64) -> Vec<(f64, f64)> {
    h.iter_quantiles(5)
        .map(|v| {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 {
                max_x
            } else {
                (1.0 / (1.0 - q)).min(max_x)
            };
            (x, v.value_iterated_to() as f64 / 1000.0)
        })
        .collect()
}

fn spectrum(h: &Histogram<u64>, title: &str, path: &Path) -> Result<()> {
    // One decade past what the sample count can resolve, at most 99.9999%.
    let decades = ((h.len() as f64).log10().ceil() as i32).clamp(2, 6);
    let max_x = 10f64.powi(decades);
    let points = spectrum_points(h, max_x);
    let y_max = (h.max() as f64 / 1000.0 * 1.1).max(0.01);
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..max_x).log_scale(), 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn timeline(report: &Report, path: &Path) -> Result<()> {
    let samples = &report.timeline;
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(360);

    let open_max = samples.iter().map(|s| s.open).max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{} — open connections", report.scenario),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..open_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("connections")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.t_s, s.open as f64)),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?;

    type Rate = fn(&crate::report::Sample) -> f64;
    let series: [(&str, RGBColor, Rate); 3] = [
        ("handshakes/s", RED, |s| s.handshakes_per_s),
        ("sent/s", GREEN, |s| s.sent_per_s),
        ("delivered/s", MAGENTA, |s| s.delivered_per_s),
    ];
    let rate_max = samples
        .iter()
        .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("throughput", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..rate_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()
        .map_err(err)?;
    for (label, color, f) in series {
        if samples.iter().all(|s| f(s) == 0.0) {
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t_s, f(s))),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(100_000.0), "99.999%");
    }

    #[test]
    fn spectrum_reaches_the_max() {
        let mut h = hist::new();
        for us in 1..=10_000 {
            hist::record(&mut h, std::time::Duration::from_micros(us));
        }
        let pts = spectrum_points(&h, 1e5);
        assert!(pts.first().unwrap().0 >= 1.0);
        let last = pts.last().unwrap();
        assert_eq!(last.0, 1e5);
        assert!((last.1 - 10.0).abs() < 0.05, "{last:?}");
        assert!(pts.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
