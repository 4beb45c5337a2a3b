//! Key files on a real file system: modes, refusals, and errors that never leak the key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kez_core::key::SecretKey;
use kez_keyfile::{KeyFileError, MAX_KEY_FILE_LEN, load, write_new};

const SEED: [u8; 32] = [42u8; 32];

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A valid key file written with `mode`, bypassing `write_new`.
fn key_file_with_mode(dir: &Path, mode: u32) -> std::path::PathBuf {
    let path = dir.join("key");
    fs::write(&path, SecretKey::from_seed(&SEED).to_key_file().as_bytes()).unwrap();
    chmod(&path, mode);
    path
}

#[test]
fn write_then_load_round_trips_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let key = SecretKey::from_seed(&SEED);
    write_new(&path, &key).unwrap();
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(load(&path).unwrap().public_key(), key.public_key());
}

#[test]
fn missing_parent_directories_are_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/key");
    write_new(&path, &SecretKey::from_seed(&SEED)).unwrap();
    assert_eq!(mode_of(&dir.path().join("a")), 0o700);
    assert_eq!(mode_of(&dir.path().join("a/b")), 0o700);
    assert_eq!(mode_of(&path), 0o600);
}

#[test]
fn existing_file_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let first = SecretKey::from_seed(&SEED);
    write_new(&path, &first).unwrap();
    let err = write_new(&path, &SecretKey::from_seed(&[1u8; 32])).unwrap_err();
    assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("already exists") && message.contains("identity"),
        "{message}"
    );
    assert_eq!(load(&path).unwrap().public_key(), first.public_key());
}

#[test]
fn symlink_at_the_target_path_is_not_followed_when_writing() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("key");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    let err = write_new(&link, &SecretKey::from_seed(&SEED)).unwrap_err();
    assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err:?}");
    assert!(!dir.path().join("elsewhere").exists());
}

#[test]
fn group_or_world_access_is_refused_with_the_fix() {
    for mode in [0o644, 0o640, 0o604, 0o620, 0o660, 0o666] {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file_with_mode(dir.path(), mode);
        let err = load(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::TooOpen { mode: m, .. } if m == mode),
            "{mode:o}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("chmod 600 {}", path.display())),
            "{message}"
        );
        assert!(message.contains(&format!("{mode:04o}")), "{message}");
    }
}

#[test]
fn owner_only_modes_are_accepted() {
    for mode in [0o400, 0o600] {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file_with_mode(dir.path(), mode);
        assert_eq!(
            load(&path).unwrap().public_key(),
            SecretKey::from_seed(&SEED).public_key()
        );
    }
}

#[test]
fn symlinks_are_followed_and_the_target_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let target = key_file_with_mode(dir.path(), 0o600);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(load(&link).is_ok());
    chmod(&target, 0o644);
    assert!(matches!(
        load(&link).unwrap_err(),
        KeyFileError::TooOpen { mode: 0o644, .. }
    ));
}

#[test]
fn garbage_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    // Looks almost like a key: the hex must still not appear in the error.
    let hex = "ab".repeat(32);
    for contents in [
        format!("ed25519-secrex:{hex}\n"),
        format!("ed25519-secret:{hex}{hex}\n"),
        format!("ed25519-secret:{}\n", hex.to_uppercase()),
        format!("{hex}\n"),
        String::new(),
    ] {
        fs::write(&path, &contents).unwrap();
        chmod(&path, 0o600);
        let err = load(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Malformed { .. }), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(&hex[..16]), "{shown}");
        assert!(!shown.contains(&hex.to_uppercase()[..16]), "{shown}");
        assert!(shown.contains("ed25519-secret:<64 hex>"), "{shown}");
    }

    fs::write(&path, [0xffu8, 0xfe, 0x00, 0x41]).unwrap();
    assert!(matches!(
        load(&path).unwrap_err(),
        KeyFileError::NotText { .. }
    ));
}

#[test]
fn oversized_file_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, vec![b'a'; MAX_KEY_FILE_LEN as usize + 1]).unwrap();
    chmod(&path, 0o600);
    let err = load(&path).unwrap_err();
    assert!(
        matches!(err, KeyFileError::TooLarge { len, .. } if len == MAX_KEY_FILE_LEN + 1),
        "{err:?}"
    );
    assert!(!err.to_string().contains("aaaa"));
}

#[test]
fn missing_file_says_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    let err = load(&path).unwrap_err();
    assert!(matches!(err, KeyFileError::NotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("create one first") && message.contains(&*path.to_string_lossy()),
        "{message}"
    );
}

#[test]
fn directory_is_not_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, KeyFileError::NotAFile { .. }), "{err:?}");
}
