//! The results: one [`Row`] per figure, the table printed at the end and the JSON written
//! beside it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What a figure must reach to pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Goal {
    /// Informational: no goal, always shown as `-`.
    None,
    /// `ours / baseline` at least this (higher is better: throughput).
    RatioAtLeast(f64),
    /// `ours - baseline` below this, in the row's unit (latency added on top of the baseline).
    AddedBelow(f64),
    /// `ours` at most this, in the row's unit (memory).
    AtMost(f64),
    /// `ours` at least this, in the row's unit (a throughput the issue names in MiB/s).
    AtLeast(f64),
    /// `ours / baseline` at most this (lower is better: a time that must not grow with a count).
    RatioAtMost(f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::None => "-".to_owned(),
            Goal::RatioAtLeast(ratio) => format!(">= {:.0}% of baseline", ratio * 100.0),
            Goal::AddedBelow(limit) => format!("adds < {limit}"),
            Goal::AtMost(limit) => format!("<= {limit}"),
            Goal::AtLeast(limit) => format!(">= {limit}"),
            Goal::RatioAtMost(ratio) => format!("<= {ratio}x baseline"),
        }
    }
}

/// One measured figure, ours beside its baseline from the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which measurement it belongs to (`chat`, `registry`, ...).
    pub section: &'static str,
    /// What was measured, with its parameters.
    pub name: String,
    /// The unit of `ours` and `baseline` (`msg/s`, `ms`, `MiB`, ...).
    pub unit: &'static str,
    /// Our figure.
    pub ours: f64,
    /// The baseline's figure, when the row has one.
    pub baseline: Option<f64>,
    /// What the baseline is.
    pub baseline_is: &'static str,
    /// The goal.
    pub goal: Goal,
}

impl Row {
    /// An informational row without a baseline.
    pub fn info(
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        ours: f64,
    ) -> Row {
        Row {
            section,
            name: name.into(),
            unit,
            ours,
            baseline: None,
            baseline_is: "-",
            goal: Goal::None,
        }
    }

    /// A row with a baseline.
    pub fn versus(
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        ours: f64,
        baseline: f64,
        baseline_is: &'static str,
        goal: Goal,
    ) -> Row {
        Row {
            section,
            name: name.into(),
            unit,
            ours,
            baseline: Some(baseline),
            baseline_is,
            goal,
        }
    }

    /// The row with `goal`.
    pub fn goal(self, goal: Goal) -> Row {
        Row { goal, ..self }
    }

    /// `ours / baseline`, when there is a (non-zero) baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .filter(|baseline| *baseline != 0.0)
            .map(|baseline| self.ours / baseline)
    }

    /// Whether the goal is met; `None` without a goal (or without the baseline it needs).
    pub fn pass(&self) -> Option<bool> {
        match self.goal {
            Goal::None => None,
            Goal::RatioAtLeast(min) => self.ratio().map(|ratio| ratio >= min),
            Goal::AddedBelow(limit) => self.baseline.map(|baseline| self.ours - baseline < limit),
            Goal::AtMost(limit) => Some(self.ours <= limit),
            Goal::AtLeast(limit) => Some(self.ours >= limit),
            Goal::RatioAtMost(max) => self.ratio().map(|ratio| ratio <= max),
        }
    }
}

/// A whole run: where and when, how, and every row.
#[derive(Debug, Serialize)]
pub struct Report {
    /// UTC time the run started, RFC 3339.
    pub started: String,
    /// How long the run took, seconds.
    pub seconds: f64,
    /// Whether it was a `--quick` run (smaller sizes and counts).
    pub quick: bool,
    /// The machine: CPU model, cores, memory, kernel.
    pub machine: String,
    /// The figures.
    pub rows: Vec<ReportRow>,
}

/// A [`Row`] with its ratio and verdict, as written to JSON.
#[derive(Debug, Serialize)]
pub struct ReportRow {
    #[serde(flatten)]
    row: Row,
    ratio: Option<f64>,
    pass: Option<bool>,
}

impl Report {
    /// A report of `rows`.
    pub fn new(started: SystemTime, took: Duration, quick: bool, rows: Vec<Row>) -> Report {
        Report {
            started: rfc3339(started),
            seconds: took.as_secs_f64(),
            quick,
            machine: machine(),
            rows: rows
                .into_iter()
                .map(|row| ReportRow {
                    ratio: row.ratio(),
                    pass: row.pass(),
                    row,
                })
                .collect(),
        }
    }

    /// The table: section, name, ours, baseline, ratio, goal, pass/miss.
    pub fn table(&self) -> String {
        let header = [
            "section", "name", "ours", "baseline", "ratio", "goal", "result",
        ];
        let mut lines: Vec<[String; 7]> = vec![header.map(str::to_owned)];
        for ReportRow { row, ratio, pass } in &self.rows {
            lines.push([
                row.section.to_owned(),
                row.name.clone(),
                format!("{} {}", number(row.ours), row.unit),
                row.baseline.map_or("-".to_owned(), |b| {
                    format!("{} {} ({})", number(b), row.unit, row.baseline_is)
                }),
                ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
                row.goal.describe(),
                match pass {
                    None => "-".to_owned(),
                    Some(true) => "pass".to_owned(),
                    Some(false) => "MISS".to_owned(),
                },
            ]);
        }
        let mut widths = [0usize; 7];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for (index, line) in lines.iter().enumerate() {
            let cells: Vec<String> = line
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            writeln!(out, "| {} |", cells.join(" | ")).expect("writing to a String");
            if index == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                writeln!(out, "|-{}-|", rule.join("-|-")).expect("writing to a String");
            }
        }
        out
    }

    /// Writes the report as JSON to `path`, creating its directory.
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let json = serde_json::to_vec_pretty(self).expect("a report serialises");
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// Three significant digits, without exponent notation for ordinary magnitudes.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || value == 0.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// CPU model, core count, memory and kernel, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} vCPU, {mem_gib:.1} GiB RAM, Linux {}",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 13 * 3600 + 61);
        assert_eq!(rfc3339(leap), "2000-02-29T13:01:01Z");
    }

    #[test]
    fn goals_decide() {
        let row = |ours, baseline, goal| Row::versus("s", "n", "u", ours, baseline, "b", goal);
        assert_eq!(row(80.0, 100.0, Goal::RatioAtLeast(0.8)).pass(), Some(true));
        assert_eq!(
            row(79.0, 100.0, Goal::RatioAtLeast(0.8)).pass(),
            Some(false)
        );
        assert_eq!(row(1.9, 1.0, Goal::AddedBelow(1.0)).pass(), Some(true));
        assert_eq!(row(2.0, 1.0, Goal::AddedBelow(1.0)).pass(), Some(false));
        assert_eq!(row(1.5, 1.0, Goal::RatioAtMost(1.5)).pass(), Some(true));
        assert_eq!(row(1.6, 1.0, Goal::RatioAtMost(1.5)).pass(), Some(false));
        assert_eq!(
            Row::info("s", "n", "u", 3.0).goal(Goal::AtMost(2.0)).pass(),
            Some(false)
        );
        assert_eq!(row(150.0, 180.0, Goal::AtLeast(150.0)).pass(), Some(true));
        assert_eq!(row(149.0, 180.0, Goal::AtLeast(150.0)).pass(), Some(false));
        assert_eq!(Row::info("s", "n", "u", 3.0).pass(), None);
    }
}
