//! `numstream-bench plot`: lateness p99 and server CPU against the number
//! of sessions, numstream and bare, from the JSON reports of several
//! `steady` runs, as a self-contained SVG (no plotting dependency).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// One steady run's figures for one flavor.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    sessions: f64,
    lateness_p99_ms: f64,
    cpu_percent: f64,
}

/// A plot panel: title, top of the y axis, and the value it shows.
type Panel = (&'static str, f64, fn(&Point) -> f64);
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 420.0;
const PANEL: f64 = 400.0;
const MARGIN: f64 = 60.0;
const COLORS: [(&str, &str); 2] = [("bare", "#888888"), ("numstream", "#d62728")];

pub(crate) fn run(reports: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut series: Vec<(&str, Vec<Point>)> =
        COLORS.iter().map(|(name, _)| (*name, Vec::new())).collect();
    for path in reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let params = &report["extra"]["params"];
        let sessions =
            params["sessions"].as_f64().unwrap_or(0.0) + params["victims"].as_f64().unwrap_or(0.0);
        for flavor in report["flavors"].as_array().into_iter().flatten() {
            let name = flavor["flavor"].as_str().unwrap_or_default();
            if let Some((_, points)) = series.iter_mut().find(|(n, _)| *n == name) {
                points.push(Point {
                    sessions,
                    lateness_p99_ms: flavor["lateness"]["p99_ms"].as_f64().unwrap_or(0.0),
                    cpu_percent: flavor["server"]["cpu_percent"].as_f64().unwrap_or(0.0),
                });
            }
        }
    }
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.sessions.total_cmp(&b.sessions));
    }
    let svg = render(&series);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, svg)?;
    println!("plot written to {}", out.display());
    Ok(())
}

fn render(series: &[(&str, Vec<Point>)]) -> String {
    let all = || series.iter().flat_map(|(_, points)| points.iter());
    let max_sessions = nice(all().map(|p| p.sessions).fold(1.0, f64::max));
    let max_lateness = nice(all().map(|p| p.lateness_p99_ms).fold(1.0, f64::max));
    let max_cpu = nice(all().map(|p| p.cpu_percent).fold(1.0, f64::max));
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panels: [Panel; 2] = [
        ("lateness p99 (ms)", max_lateness, |p| p.lateness_p99_ms),
        ("server CPU (% of one core)", max_cpu, |p| p.cpu_percent),
    ];
    for (i, (title, max_y, y_of)) in panels.iter().enumerate() {
        let left = MARGIN + i as f64 * (PANEL + MARGIN);
        let (top, bottom) = (30.0, HEIGHT - 50.0);
        let x = |sessions: f64| left + PANEL * sessions / max_sessions;
        let y = |value: f64| bottom - (bottom - top) * value / max_y;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="18" text-anchor="middle" font-weight="bold">{title}</text>"#,
            left + PANEL / 2.0
        );
        let _ = writeln!(
            svg,
            r#"<path d="M{left},{top} V{bottom} H{}" stroke="black" fill="none"/>"#,
            left + PANEL
        );
        for tick in 0..=4 {
            let fraction = f64::from(tick) / 4.0;
            let (tx, ty) = (x(max_sessions * fraction), y(max_y * fraction));
            let _ = writeln!(
                svg,
                r##"<text x="{tx}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="end">{}</text><path d="M{left},{ty} H{}" stroke="#eeeeee"/>"##,
                bottom + 16.0,
                max_sessions * fraction,
                left - 4.0,
                ty + 4.0,
                max_y * fraction,
                left + PANEL
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">sessions</text>"#,
            left + PANEL / 2.0,
            bottom + 34.0
        );
        for ((name, points), (_, color)) in series.iter().zip(COLORS) {
            if points.is_empty() {
                continue;
            }
            let path: Vec<String> = points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.sessions), y(y_of(p))))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" stroke="{color}" stroke-width="2" fill="none"/>"#,
                path.join(" ")
            );
            for p in points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{name}: {} sessions, {:.2}</title></circle>"#,
                    x(p.sessions),
                    y(y_of(p)),
                    p.sessions,
                    y_of(p)
                );
            }
        }
    }
    for (i, (name, color)) in COLORS.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            MARGIN + 10.0,
            40.0 + 18.0 * i as f64,
            MARGIN + 28.0,
            50.0 + 18.0 * i as f64
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The smallest 1, 2 or 5 × 10^k at or above `value`.
fn nice(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|candidate| *candidate >= value)
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up_to_readable_values() {
        assert_eq!(nice(19_000.0), 20_000.0);
        assert_eq!(nice(3.2), 5.0);
        assert_eq!(nice(100.0), 100.0);
    }

    #[test]
    fn renders_both_flavors() {
        let point = |sessions, lateness_p99_ms, cpu_percent| Point {
            sessions,
            lateness_p99_ms,
            cpu_percent,
        };
        let series = vec![
            (
                "bare",
                vec![point(1000.0, 2.0, 3.0), point(19000.0, 6.0, 36.0)],
            ),
            ("numstream", vec![point(1000.0, 2.5, 4.0)]),
        ];
        let svg = render(&series);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 4);
    }
}
