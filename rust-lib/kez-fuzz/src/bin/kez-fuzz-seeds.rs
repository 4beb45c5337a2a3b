//! Writes every target's seed inputs to `<dir>/<target>/seed-<n>`: `kez-fuzz-seeds fuzz/corpus`.

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: kez-fuzz-seeds <corpus dir>");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    for (name, _) in kez_fuzz::TARGETS {
        let target_dir = dir.join(name);
        std::fs::create_dir_all(&target_dir).expect("creates the corpus directory");
        for (n, seed) in kez_fuzz::seeds::seeds(name).iter().enumerate() {
            std::fs::write(target_dir.join(format!("seed-{n}")), seed).expect("writes a seed");
        }
    }
}
