//! The SVG plot: one panel per workload with each variant's latency by percentile (x axis in
//! "nines", so the tail gets as much room as the median), plus a panel of throughput relative to
//! the baseline.

use crate::report::Summary;
use crate::variants::VariantKind;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// Percentile → x position: 0 → 0, 90 → 1, 99 → 2, 99.9 → 3, 99.99 → 4.
fn nines(p: f64) -> f64 {
    let tail = (1.0 - p / 100.0).max(1e-4);
    -tail.log10()
}

fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if x < 0.5 {
        "p0".into()
    } else {
        let s = format!("{p:.2}");
        format!("p{}", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

fn color(kind: VariantKind) -> RGBColor {
    match kind {
        VariantKind::Direct => RGBColor(120, 120, 120),
        VariantKind::Static => RGBColor(31, 119, 180),
        VariantKind::Module => RGBColor(214, 39, 40),
        VariantKind::ExtProc => RGBColor(44, 160, 44),
    }
}

pub fn latency_svg(path: &Path, summaries: &[Summary], title: &str) -> Result<()> {
    let mut workloads: Vec<&str> = vec![];
    for s in summaries {
        if !workloads.contains(&s.workload.as_str()) {
            workloads.push(&s.workload);
        }
    }
    let panels_n = workloads.len() + 1;
    let cols = 3usize;
    let rows = panels_n.div_ceil(cols);
    let size = (cols as u32 * 420, rows as u32 * 300 + 40);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plotting: {e}");
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|err| anyhow!("plotting: {err}"))?;
    let areas = root.split_evenly((rows, cols));

    for (area, wl) in areas.iter().zip(&workloads) {
        let series: Vec<&Summary> = summaries.iter().filter(|s| s.workload == *wl).collect();
        // The tail past p99.99 is a handful of samples; cap the axis there so one outlier does
        // not flatten every curve.
        let ymax = series
            .iter()
            .flat_map(|s| s.curve.iter().filter(|(p, _)| *p <= 99.99).map(|(_, v)| *v))
            .fold(0.0, f64::max)
            .max(0.001)
            * 1.1;
        let unit = series.first().map_or("op", |s| s.unit);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{wl}: latency per {unit}"), ("sans-serif", 15))
            .margin(8)
            .margin_right(22)
            .x_label_area_size(28)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..4.0f64, 0f64..ymax)
            .map_err(|err| anyhow!("plotting: {err}"))?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x| nines_label(*x))
            .y_desc("ms")
            .draw()
            .map_err(|err| anyhow!("plotting: {err}"))?;
        for s in &series {
            let c = color(s.variant);
            let pts: Vec<(f64, f64)> = s
                .curve
                .iter()
                .filter(|(p, _)| *p <= 99.99)
                .map(|&(p, v)| (nines(p), v))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|err| anyhow!("plotting: {err}"))?
                .label(s.variant.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(|err| anyhow!("plotting: {err}"))?;
    }

    if let Some(area) = areas.get(workloads.len()) {
        throughput_panel(area, summaries, &workloads)?;
    }
    root.present()
        .map_err(|err| anyhow!("writing SVG: {err}"))?;
    Ok(())
}

/// Bars: each variant's throughput ÷ the baseline's, per workload.
fn throughput_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    summaries: &[Summary],
    workloads: &[&str],
) -> Result<()> {
    // Direct is left out: it is many times the proxies' rate and would flatten their bars.
    let kinds: Vec<VariantKind> = VariantKind::ALL
        .into_iter()
        .filter(|k| *k != VariantKind::Direct && summaries.iter().any(|s| s.variant == *k))
        .collect();
    let ymax = summaries
        .iter()
        .filter(|s| s.variant != VariantKind::Direct)
        .filter_map(|s| s.ops_ratio.map(|r| r.max))
        .fold(1.0, f64::max)
        * 1.45;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "throughput ÷ static (median of paired rounds; whisker: range)",
            ("sans-serif", 15),
        )
        .margin(8)
        .x_label_area_size(90)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..workloads.len() as f64, 0f64..ymax)
        .map_err(|err| anyhow!("plotting: {err}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .draw()
        .map_err(|err| anyhow!("plotting: {err}"))?;
    // Workload names under each group, rotated to fit: drawn on the panel in pixels because
    // an f64 axis offers no tick at each group's centre.
    let base = area.get_base_pixel();
    let style = ("sans-serif", 10)
        .into_font()
        .transform(FontTransform::Rotate90)
        .color(&BLACK);
    for (i, wl) in workloads.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        area.draw(&Text::new(
            wl.to_string(),
            (px - base.0 + 5, py - base.1 + 6),
            style.clone(),
        ))
        .map_err(|err| anyhow!("plotting: {err}"))?;
    }
    let width = 0.8 / kinds.len().max(1) as f64;
    for (k_i, kind) in kinds.iter().enumerate() {
        let c = color(*kind);
        let bars = workloads.iter().enumerate().filter_map(|(w_i, wl)| {
            let s = summaries
                .iter()
                .find(|s| s.workload == *wl && s.variant == *kind)?;
            let x0 = w_i as f64 + 0.1 + k_i as f64 * width;
            Some((x0, width * 0.9, s.ops_ratio?))
        });
        let bars: Vec<_> = bars.collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x0, w, r)| Rectangle::new([(x0, 0.0), (x0 + w, r.median)], c.filled())),
            )
            .map_err(|err| anyhow!("plotting: {err}"))?
            .label(kind.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 12, y + 4)], c.filled()));
        // Whisker: the range of the per-round ratios, i.e. how much to trust the bar.
        chart
            .draw_series(bars.iter().map(|&(x0, w, r)| {
                let x = x0 + w / 2.0;
                PathElement::new(vec![(x, r.min), (x, r.max)], BLACK.stroke_width(1))
            }))
            .map_err(|err| anyhow!("plotting: {err}"))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 1.0), (workloads.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(|err| anyhow!("plotting: {err}"))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|err| anyhow!("plotting: {err}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_axis_round_trips() {
        assert_eq!(nines(90.0).round(), 1.0);
        assert_eq!(nines(99.9).round(), 3.0);
        assert_eq!(nines_label(2.0), "p99");
        assert_eq!(nines_label(3.0), "p99.9");
    }
}
