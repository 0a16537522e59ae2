//! Directories the server creates for its data: the data directory, the embedded store's and
//! the local media's. They hold every message and every uploaded file, so each is created
//! readable by the server's user alone (mode 0700 on Unix), as the token secret is (0600): the
//! store's and media's files inside, made with the process's umask, are then out of other
//! local users' reach. A directory that exists already keeps the mode its owner gave it (a
//! volume mounted for it, a directory made by the service manager).

use std::path::Path;

/// Creates `path` and any missing parent, each readable by this process's user alone; does
/// nothing to those that exist.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_directories_are_private_and_existing_ones_keep_their_mode() {
        let parent = tempfile::tempdir().unwrap();
        let existing = parent.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let created = existing.join("a").join("b");
        create_private(&created).unwrap();
        create_private(&created).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&created), 0o700);
        assert_eq!(mode(created.parent().unwrap()), 0o700);
        assert_eq!(mode(&existing), 0o755);
    }
}
