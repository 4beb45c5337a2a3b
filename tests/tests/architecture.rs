//! The dependency rules ARCHITECTURE.md states, checked against `cargo metadata`, and the one
//! home of every service subject. The table in ARCHITECTURE.md's "Dependency rules" is read
//! here: a rule changes there, or this test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use kez_proto::Endpoint;
use serde_json::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

/// The crates of the workspace and, per package name, its normal (non-dev, non-build)
/// dependencies as package names, from `cargo metadata` (offline: the build fetched them).
struct Graph {
    members: BTreeSet<String>,
    normal: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn load() -> Graph {
        // Only this machine's platform: the others' dependencies were never fetched.
        let rustc = Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc runs");
        let host = String::from_utf8(rustc.stdout)
            .expect("UTF-8")
            .lines()
            .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
            .expect("rustc names its host");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--offline", "--locked"])
            .args(["--filter-platform", &host])
            .current_dir(workspace_root())
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata JSON");
        let name_of: BTreeMap<&str, String> = metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|package| {
                (
                    package["id"].as_str().expect("id"),
                    package["name"].as_str().expect("name").to_owned(),
                )
            })
            .collect();
        let members = metadata["workspace_members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|id| name_of[id.as_str().expect("id")].clone())
            .collect();
        let mut normal: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for node in metadata["resolve"]["nodes"].as_array().expect("nodes") {
            let name = name_of[node["id"].as_str().expect("id")].clone();
            let deps = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|dep| {
                    dep["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .any(|kind| kind["kind"].is_null())
                })
                .map(|dep| name_of[dep["pkg"].as_str().expect("pkg")].clone());
            normal.entry(name).or_default().extend(deps);
        }
        Graph { members, normal }
    }

    /// Everything `name` links, directly or not, outside its dev-dependencies.
    fn reaches(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(next) = todo.pop() {
            for dep in self.normal.get(&next).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    todo.push(dep.clone());
                }
            }
        }
        seen
    }

    /// The workspace crates `name` depends on directly.
    fn workspace_deps(&self, name: &str) -> BTreeSet<String> {
        self.normal[name]
            .iter()
            .filter(|dep| self.members.contains(*dep))
            .cloned()
            .collect()
    }
}

/// One row of ARCHITECTURE.md's table: a crate, the workspace crates it depends on (`None`:
/// any), and the crates it must never reach.
struct Rule {
    krate: String,
    depends_on: Option<BTreeSet<String>>,
    never: BTreeSet<String>,
}

fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md")).unwrap();
    let table = text
        .split("## Dependency rules")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"Dependency rules\" section");
    let list = |cell: &str| -> BTreeSet<String> {
        cell.split(',')
            .map(|name| name.trim().trim_matches('`').to_owned())
            .filter(|name| !name.is_empty() && name != "—")
            .collect()
    };
    table
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 3, "a rule row has three cells: {line}");
            Rule {
                krate: cells[0].trim_matches('`').to_owned(),
                depends_on: (cells[1] != "any").then(|| list(cells[1])),
                never: list(cells[2]),
            }
        })
        .collect()
}

#[test]
fn the_crates_depend_on_what_architecture_md_says() {
    let graph = Graph::load();
    let rules = rules();
    let ruled: BTreeSet<String> = rules.iter().map(|rule| rule.krate.clone()).collect();
    assert_eq!(
        ruled, graph.members,
        "ARCHITECTURE.md has one rule per workspace crate"
    );
    for rule in &rules {
        if let Some(expected) = &rule.depends_on {
            assert_eq!(
                &graph.workspace_deps(&rule.krate),
                expected,
                "{}'s workspace dependencies (ARCHITECTURE.md, Dependency rules)",
                rule.krate
            );
        }
        let reached = graph.reaches(&rule.krate);
        let forbidden: Vec<&String> = rule.never.intersection(&reached).collect();
        assert!(
            forbidden.is_empty(),
            "{} must never link {forbidden:?} (ARCHITECTURE.md, Dependency rules)",
            rule.krate
        );
    }
    // The rules that matter most, whatever the table says.
    for pure in ["kez-core", "kez-proto", "kez-nats-jwt"] {
        for io in ["tokio", "async-nats", "iroh", "redb", "hyper"] {
            assert!(!graph.reaches(pure).contains(io), "{pure} links {io}");
        }
    }
    for client in ["kez-client", "kez-chat", "kez-fuzz"] {
        assert!(
            !graph.reaches(client).contains("kez-chat-server"),
            "{client} links the server"
        );
    }
}

/// The Rust sources of the shipped crates (not tests, benches or the fuzz wrappers).
fn shipped_sources() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut dirs: Vec<PathBuf> = ["kez-chat-server/src", "kez-chat/src"]
        .iter()
        .map(|dir| root.join(dir))
        .collect();
    for entry in std::fs::read_dir(root.join("rust-lib")).unwrap() {
        dirs.push(entry.unwrap().path().join("src"));
    }
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn every_service_subject_is_written_in_one_source_file() {
    let sources: Vec<(PathBuf, String)> = shipped_sources()
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect();
    for endpoint in Endpoint::ALL {
        if endpoint == Endpoint::Authorize {
            continue; // nats-server's subject, kez-nats-jwt's to name
        }
        let literal = format!("\"{}\"", endpoint.subject());
        let homes: Vec<&Path> = sources
            .iter()
            .filter(|(_, text)| text.contains(&literal))
            .map(|(path, _)| path.as_path())
            .collect();
        assert_eq!(
            homes,
            [workspace_root().join("rust-lib/kez-proto/src/endpoint.rs")],
            "{literal} is written in these files"
        );
    }
}
