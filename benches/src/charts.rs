//! SVG charts of a report (plotters): throughput and latency over
//! concurrency, cold start per sandbox, kiln beside its peer.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::Scenario;

const SIZE: (u32, u32) = (860, 480);
const COLOURS: [RGBColor; 4] = [
    RGBColor(37, 99, 235),
    RGBColor(220, 38, 38),
    RGBColor(5, 150, 105),
    RGBColor(217, 119, 6),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// Draws the legend and writes the file.
fn legend_and_save<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// The scenario named `name`, if the run had it.
fn find<'a>(scenarios: &'a [Scenario], name: &str) -> Option<&'a Scenario> {
    scenarios.iter().find(|s| s.name == name)
}

/// One line of a chart over concurrency: its label, the prefix of its
/// scenarios' names, and the value it plots of each.
type Line<'a> = (&'a str, String, fn(&Scenario) -> f64);

/// Lines over the concurrency levels: one per `(label, prefix)`, the value
/// of each level's `{prefix}-c{level}` scenario picked by `value`.
fn over_concurrency(
    path: &Path,
    title: &str,
    y_desc: &str,
    scenarios: &[Scenario],
    lines: &[Line<'_>],
) -> Result<bool> {
    let levels = crate::suite::LEVELS;
    let series: Vec<(&str, Vec<(f64, f64)>)> = lines
        .iter()
        .map(|(label, prefix, value)| {
            let points = levels
                .iter()
                .filter_map(|c| {
                    find(scenarios, &format!("{prefix}-c{c}")).map(|s| (*c as f64, value(s)))
                })
                .collect();
            (*label, points)
        })
        .filter(|(_, p): &(&str, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..64f64).log_scale(), 0f64..top.max(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("concurrency (closed-loop clients)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (label, points)) in series.into_iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )
            .map_err(err)?;
    }
    legend_and_save(&mut chart, &root)?;
    Ok(true)
}

/// Grouped bars: one group per category, one bar per series.
fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<bool> {
    if categories.is_empty() {
        return Ok(false);
    }
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = categories.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top.max(1.0))
        .map_err(err)?;
    let names = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    let width = 0.8 / series.len() as f64;
    for (j, (label, values)) in series.iter().enumerate() {
        let colour = COLOURS[j % COLOURS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + j as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], colour.filled())
            }))
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    legend_and_save(&mut chart, &root)?;
    Ok(true)
}

/// Draws every chart the report has the scenarios for into `dir`; returns
/// the files written.
pub fn draw(dir: &Path, scenarios: &[Scenario]) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let throughput = dir.join("throughput.svg");
    if over_concurrency(
        &throughput,
        "Warm invocations per second over HTTP",
        "requests/s",
        scenarios,
        &[
            ("no-op (examples/hello)", "sweep-noop".into(), |s| {
                s.throughput_rps.unwrap_or(0.0)
            }),
            ("64 KB echo", "sweep-echo-64k".into(), |s| {
                s.throughput_rps.unwrap_or(0.0)
            }),
        ],
    )? {
        written.push(throughput);
    }
    let latency = dir.join("latency.svg");
    if over_concurrency(
        &latency,
        "Warm invoke latency over HTTP, no-op",
        "µs",
        scenarios,
        &[
            ("p50", "sweep-noop".into(), |s| s.latency_us.p50),
            ("p99", "sweep-noop".into(), |s| s.latency_us.p99),
            ("p99.9", "sweep-noop".into(), |s| s.latency_us.p999),
        ],
    )? {
        written.push(latency);
    }
    let cold: Vec<&Scenario> = scenarios
        .iter()
        .filter(|s| s.name.starts_with("cold-start-"))
        .collect();
    let cold_path = dir.join("cold-start.svg");
    if bars(
        &cold_path,
        "Cold start: first invoke of a new version",
        "ms",
        &cold
            .iter()
            .map(|s| s.name.trim_start_matches("cold-start-").to_owned())
            .collect::<Vec<_>>(),
        &[
            (
                "p50",
                cold.iter().map(|s| s.latency_us.p50 / 1000.0).collect(),
            ),
            (
                "p99",
                cold.iter().map(|s| s.latency_us.p99 / 1000.0).collect(),
            ),
        ],
    )? {
        written.push(cold_path);
    }
    let levels: Vec<usize> = crate::suite::LEVELS
        .iter()
        .copied()
        .filter(|c| find(scenarios, &format!("peer-kiln-vs-wasmtime-serve-c{c}")).is_some())
        .collect();
    let peers_path = dir.join("peers.svg");
    let rate = |name: String| {
        find(scenarios, &name)
            .and_then(|s| s.throughput_rps)
            .unwrap_or(0.0)
    };
    let mut series = vec![
        (
            "kiln",
            levels
                .iter()
                .map(|c| rate(format!("peer-kiln-vs-wasmtime-serve-c{c}")))
                .collect::<Vec<_>>(),
        ),
        (
            "wasmtime serve",
            levels
                .iter()
                .map(|c| rate(format!("peer-wasmtime-serve-c{c}")))
                .collect(),
        ),
    ];
    if levels
        .iter()
        .all(|c| find(scenarios, &format!("peer-axum-hello-c{c}")).is_some())
    {
        series.push((
            "bare axum (no sandbox)",
            levels
                .iter()
                .map(|c| rate(format!("peer-axum-hello-c{c}")))
                .collect(),
        ));
    }
    if bars(
        &peers_path,
        "kiln and its peers, same work, same run",
        "requests/s",
        &levels
            .iter()
            .map(|c| format!("concurrency {c}"))
            .collect::<Vec<_>>(),
        &series,
    )? {
        written.push(peers_path);
    }
    Ok(written)
}
