//! How the embedded store's volume is mounted, where that costs its latency.
//!
//! **Online discard.** A filesystem mounted with `discard` tells the device about the blocks of
//! each deleted file as it frees them, and on ext4 every fsync on the volume waits for that:
//! on the test machine, deleting six 64 MB files held a concurrent fsync for 55-119 ms, against
//! 8 ms or less without the option. The store deletes files that large all the time (its journal
//! files, ~100 MB each under load, and the tables a compaction replaced), and every `sent` waits
//! for an fsync of its journal: at 10,000 msgs/s over 180 s the send-ACK p99 was 45-46 ms with
//! `discard` and 35-37 ms without (`docs/benchmarks.md`, "Journals kept by a keyspace written
//! once a minute; deletes on a volume mounted with discard"). So the store warns when it opens on
//! such a volume; a periodic `fstrim` does the same work off the write path
//! (`docs/operations.md`, "Durability").

use std::path::Path;

/// Logs a warning when the volume that holds `dir` is mounted with online discard (Linux, from
/// `/proc/self/mountinfo`; elsewhere nothing).
pub(crate) fn warn_of_online_discard(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    if let Some(mount_point) = mounted_with_discard(&mountinfo, &dir) {
        tracing::warn!(
            %mount_point,
            "the store's volume is mounted with `discard`: each file the store deletes holds up \
             the journal's fsyncs, and every `sent` waits for one; mount it without and trim it \
             with a periodic `fstrim` (docs/operations.md, \"Durability\")"
        );
    }
}

/// The mount point of the filesystem that holds `dir` (an absolute path without symbolic
/// links), if `mountinfo` (the text of `/proc/self/mountinfo`) says it is mounted with online
/// discard, in its mount options or its filesystem's.
fn mounted_with_discard(mountinfo: &str, dir: &Path) -> Option<String> {
    let (mount_point, options) = mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [TAGS...] - TYPE SOURCE SUPER_OPTIONS
            let (mount, filesystem) = line.split_once(" - ")?;
            let mut fields = mount.split(' ');
            let mount_point = unescape(fields.nth(4)?);
            let options = [fields.next()?, filesystem.split(' ').nth(2)?];
            Some((mount_point, options))
        })
        .filter(|(mount_point, _)| dir.starts_with(mount_point))
        // The last of the longest: a later mount on the same point hides the earlier.
        .max_by_key(|(mount_point, _)| mount_point.len())?;
    options
        .iter()
        .flat_map(|options| options.split(','))
        .any(|option| option == "discard")
        .then_some(mount_point)
}

/// A mount point as `mountinfo` writes it: the kernel escapes space, tab, newline and
/// backslash as octal (`\040`). The backslash is undone last, so that a name holding `\040`
/// itself (written `\134040`) keeps it.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict
31 27 0:26 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
40 27 254:16 / /var/lib/courier rw,noatime shared:20 - ext4 /dev/vdb rw
41 27 254:32 / /srv/my\\040store rw,discard - xfs /dev/vdc rw,attr2
42 27 254:48 / /mnt/trim rw - ext4 /dev/vdd rw,nodiscard
";

    #[test]
    fn a_store_on_a_volume_mounted_with_discard_is_named() {
        let found = |dir: &str| mounted_with_discard(MOUNTINFO, Path::new(dir));
        // The filesystem's own options, and the mount's.
        assert_eq!(found("/home/courier/data").as_deref(), Some("/"));
        assert_eq!(
            found("/srv/my store/data").as_deref(),
            Some("/srv/my store")
        );
        // The longest mount point that holds the directory decides.
        assert_eq!(found("/var/lib/courier/data"), None);
        assert_eq!(found("/var/lib/courier"), None);
        assert_eq!(found("/var/lib/courierx").as_deref(), Some("/"));
        // `nodiscard` is not `discard`.
        assert_eq!(found("/mnt/trim/data"), None);
    }

    #[test]
    fn a_mount_on_a_mount_point_hides_the_one_before() {
        let remounted =
            format!("{MOUNTINFO}43 40 254:64 / /var/lib/courier rw,discard - ext4 /dev/vde rw\n");
        let found = mounted_with_discard(&remounted, Path::new("/var/lib/courier/data"));
        assert_eq!(found.as_deref(), Some("/var/lib/courier"));
        assert_eq!(
            mounted_with_discard("not a mountinfo\n", Path::new("/data")),
            None
        );
    }
}
