//! Backups of `courier serve`'s data directory: `courier backup` while the server runs (or
//! while it is stopped), `courier restore` into a new data directory (`docs/operations.md`,
//! "Backups").
//!
//! **What a backup holds.** The store as of one moment (`courier_store::backup`), the media
//! bytes its records keep, and the token secret the server generated, if any: what a server
//! needs to go on where the copy was taken. Not the settings (flags, configuration file),
//! which the operator keeps, nor a JWKS the server fetched, which it fetches again.
//!
//! **While the server runs.** The server listens on a Unix socket in its data directory
//! ([`SOCKET`]), which only the data directory's owner can reach (`courier_core::dirs`): it
//! takes the snapshot, then streams the archive on a thread of its own at the lowest CPU
//! priority, one backup at a time. A reader that stops reading for [`STALL_LIMIT`] ends the
//! backup, so that no one holds the snapshot (and the disk it keeps) for good. When no server
//! answers on the socket, `courier backup` opens the store itself.
//!
//! **The archive.** A tar file, so that standard tools can list it and take the media out:
//! `courier-backup.json` (the format, the commit versions' ceiling), `store/NNNNNNNN.pairs`
//! (the store's pairs, each chunk ended by its CRC-32), `media/<sha256>` (each blob, whose
//! name is the hash of its bytes), `jwt-secret`, and last `end.json` with the counts and the
//! ceiling again. Reading one checks all of it: the order of the entries, each chunk's CRC,
//! each blob's hash, the counts and the ceiling, so a backup cut short or damaged is refused,
//! never restored in part.
//!
//! **Media kept by the snapshot.** The blobs copied are those the snapshot's media records
//! keep, read after the store's pairs: the bytes of a record the sweeper forgot meanwhile may
//! be gone by then (counted as missing, and the restored server sweeps that record), and
//! uploads after the snapshot are not in the backup, with their records.

use anyhow::{Context, bail};
use courier_core::auth::MIN_SECRET_BYTES;
use courier_core::loops::CancellationToken;
use courier_store::Keys;
use courier_store::backup::{StoreImport, StoreSnapshot, holds_store};
use courier_store::embedded::EmbeddedEngine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The socket of a running server's backups, in its data directory.
pub const SOCKET: &str = "backup.sock";
/// The store's directory in a data directory (as `courier serve` keeps it).
const STORE_DIR: &str = crate::serve::STORE_DIR;
/// The format this version writes and reads.
const FORMAT: u32 = 1;
const MANIFEST: &str = "courier-backup.json";
const END: &str = "end.json";
const SECRET: &str = "jwt-secret";
/// The pairs' bytes in one `store/` chunk of the archive.
const CHUNK_BYTES: usize = 8 << 20;
/// The largest token secret file read.
const SECRET_MAX_BYTES: u64 = 64 << 10;
/// How long a running server waits for a backup's reader to take more bytes.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How long the server waits after a failed accept of a backup's connection.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often the commands report their progress on standard error.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The first entry: what the archive is.
#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// The version of Courier that wrote it.
    courier: String,
    created_ms: u64,
    commit_version_ceiling: u64,
}

/// The last entry: what the archive holds, checked against what was read.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub pairs: u64,
    pub chunks: u64,
    pub media: u64,
    /// Media bytes the snapshot kept that were gone when they were copied (or whose record's
    /// claim on them does not decode).
    pub media_missing: u64,
    /// The store keeps media, and no media directory was there to copy them from (they are in
    /// a bucket, or elsewhere than the command was told).
    pub media_not_copied: bool,
    pub secret: bool,
    /// The manifest's commit versions' ceiling again, as the manifest has no CRC of its own: a
    /// store restored with a lower one would stamp its commits with versions it holds.
    pub commit_version_ceiling: u64,
}

/// Where a server's data is: its data directory, and the local directory of its media
/// (`None` when the media live in a bucket).
#[derive(Clone)]
pub struct Sources {
    pub data_dir: PathBuf,
    pub media_dir: Option<PathBuf>,
}

/// Writes the archive of `snapshot` and of the files `sources` name to `out`, telling
/// `progress` what it wrote after each entry; stops with an error once `stop` is set.
pub fn write_archive(
    snapshot: &StoreSnapshot,
    sources: &Sources,
    out: impl Write,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Totals),
) -> anyhow::Result<Totals> {
    let mut tar = tar::Builder::new(out);
    let mut totals = Totals {
        commit_version_ceiling: snapshot.commit_version_ceiling(),
        ..Totals::default()
    };
    let manifest = Manifest {
        format: FORMAT,
        courier: env!("CARGO_PKG_VERSION").to_owned(),
        created_ms: courier_core::clock::now_ms(),
        commit_version_ceiling: snapshot.commit_version_ceiling(),
    };
    append(&mut tar, MANIFEST, &serde_json::to_vec(&manifest)?)?;
    let mut chunk = Vec::with_capacity(CHUNK_BYTES + (64 << 10));
    for pair in snapshot.pairs() {
        let (key, value) = pair?;
        for part in [&key[..], &value[..]] {
            chunk.extend_from_slice(&(part.len() as u32).to_le_bytes());
            chunk.extend_from_slice(part);
        }
        totals.pairs += 1;
        if chunk.len() >= CHUNK_BYTES {
            write_chunk(&mut tar, &mut chunk, &mut totals, stop)?;
            progress(&totals);
        }
    }
    if !chunk.is_empty() {
        write_chunk(&mut tar, &mut chunk, &mut totals, stop)?;
    }
    let keys = Keys::new(b"");
    totals.media_not_copied =
        sources.media_dir.is_none() && snapshot.range(keys.all_blob_users()).next().is_some();
    if let Some(media_dir) = &sources.media_dir {
        let mut last: Option<String> = None;
        for pair in snapshot.range(keys.all_blob_users()) {
            let (key, _) = pair?;
            // A key that does not decode is in the archive with the others; only the bytes
            // it would name cannot be.
            let Some(sha256) = keys.blob_of_user(&key).filter(|sha256| is_sha256(sha256)) else {
                tracing::warn!(
                    ?key,
                    "a media record's claim on its bytes does not decode; its bytes are not in the backup"
                );
                totals.media_missing += 1;
                continue;
            };
            if last.as_ref() == Some(&sha256) {
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                bail!("the server is stopping");
            }
            match open_blob(media_dir, &sha256)? {
                Some(file) => {
                    append_file(&mut tar, &format!("media/{sha256}"), file)?;
                    totals.media += 1;
                    progress(&totals);
                }
                None => {
                    tracing::debug!(
                        sha256,
                        "media bytes kept by the store are gone; not in the backup"
                    );
                    totals.media_missing += 1;
                }
            }
            last = Some(sha256);
        }
    }
    let secret = sources.data_dir.join(SECRET);
    if let Some(file) = open_if_present(&secret)? {
        append_file(&mut tar, SECRET, file)?;
        totals.secret = true;
    }
    append(&mut tar, END, &serde_json::to_vec(&totals)?)?;
    tar.into_inner()?.flush()?;
    Ok(totals)
}

fn write_chunk(
    tar: &mut tar::Builder<impl Write>,
    chunk: &mut Vec<u8>,
    totals: &mut Totals,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    if stop.load(Ordering::Relaxed) {
        bail!("the server is stopping");
    }
    let crc = crc32fast::hash(chunk);
    chunk.extend_from_slice(&crc.to_le_bytes());
    append(tar, &format!("store/{:08}.pairs", totals.chunks), chunk)?;
    totals.chunks += 1;
    chunk.clear();
    Ok(())
}

fn header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(courier_core::clock::now_ms() / 1000);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn append(tar: &mut tar::Builder<impl Write>, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
    tar.append_data(&mut header(bytes.len() as u64), path, bytes)?;
    Ok(())
}

/// Appends `file` as it is when opened (a blob's bytes never change; one deleted meanwhile is
/// still read whole through its handle).
fn append_file(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    file: std::fs::File,
) -> anyhow::Result<()> {
    let size = file.metadata()?.len();
    tar.append_data(&mut header(size), path, file.take(size))?;
    Ok(())
}

fn open_if_present(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The bytes `sha256` in `media_dir`: where the media service keeps them (`blobs/`), or where
/// its sweeper put them aside, to delete or move back (`trash/`).
fn open_blob(media_dir: &Path, sha256: &str) -> anyhow::Result<Option<std::fs::File>> {
    if let Some(file) = open_if_present(&media_dir.join("blobs").join(sha256))? {
        return Ok(Some(file));
    }
    let aside = match std::fs::read_dir(media_dir.join("trash")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading the media put aside"),
    };
    for entry in aside.flatten() {
        let name = entry.file_name();
        if name
            .to_str()
            .and_then(|n| n.split_once('.'))
            .is_some_and(|(hash, _)| hash == sha256)
            && let Some(file) = open_if_present(&entry.path())?
        {
            return Ok(Some(file));
        }
    }
    // Moved back by the sweeper while `trash/` was read (a record took them meanwhile).
    open_if_present(&media_dir.join("blobs").join(sha256))
}

fn is_sha256(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// What reading an archive finds, in order ([`read_archive`]).
trait Visitor {
    fn manifest(&mut self, ceiling: u64) -> anyhow::Result<()>;
    fn pair(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()>;
    /// Blob `sha256`: `bytes` is its content, checked against its hash by [`copy_checked`].
    fn media(&mut self, sha256: &str, bytes: &mut dyn Read) -> anyhow::Result<()>;
    fn secret(&mut self, secret: Vec<u8>) -> anyhow::Result<()>;
    /// The archive is whole and every check passed.
    fn end(&mut self, totals: &Totals) -> anyhow::Result<()>;
}

/// Reads the archive `input` to its end through `visitor`, checking it whole (module
/// documentation).
fn read_archive(
    input: impl Read,
    visitor: &mut dyn Visitor,
    progress: &mut Progress,
) -> anyhow::Result<Totals> {
    let mut archive = tar::Archive::new(input);
    let mut read = Totals::default();
    let mut manifest_read = false;
    let mut ended = false;
    // Raw: a GNU long name or PAX header, which this version never writes, is an entry of its
    // own, refused by its name before it is read (merged, it was read into memory whole, however
    // large its header said it was).
    let entries = archive.entries().context("reading the backup")?.raw(true);
    for entry in entries {
        let mut entry = entry.context("reading the backup")?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if ended {
            bail!("the backup holds {path} after its end: not a backup this version wrote");
        }
        if !manifest_read {
            if path != MANIFEST {
                bail!("not a Courier backup: it starts with {path}, not {MANIFEST}");
            }
            let manifest: Manifest = serde_json::from_slice(&read_small(&mut entry, 64 << 10)?)
                .context("the backup's manifest does not decode")?;
            if manifest.format != FORMAT {
                bail!(
                    "the backup is of format {} (Courier {}); this version reads format {FORMAT}",
                    manifest.format,
                    manifest.courier
                );
            }
            // Checked before any pair is written (the manifest has no CRC of its own).
            courier_store::backup::check_ceiling(manifest.commit_version_ceiling)?;
            visitor.manifest(manifest.commit_version_ceiling)?;
            read.commit_version_ceiling = manifest.commit_version_ceiling;
            manifest_read = true;
            continue;
        }
        if let Some(number) = path
            .strip_prefix("store/")
            .and_then(|p| p.strip_suffix(".pairs"))
        {
            if number != format!("{:08}", read.chunks) {
                bail!(
                    "the backup's store chunk {path} is out of place: expected chunk {}",
                    read.chunks
                );
            }
            let chunk = read_small(&mut entry, (CHUNK_BYTES as u64) * 2)?;
            read.pairs += read_chunk(&chunk, &path, visitor)?;
            read.chunks += 1;
        } else if let Some(sha256) = path.strip_prefix("media/") {
            if !is_sha256(sha256) {
                bail!("the backup holds {path}, not a media blob's name");
            }
            visitor.media(sha256, &mut entry)?;
            read.media += 1;
        } else if path == SECRET {
            visitor.secret(read_small(&mut entry, SECRET_MAX_BYTES)?)?;
            read.secret = true;
        } else if path == END {
            let totals: Totals = serde_json::from_slice(&read_small(&mut entry, 64 << 10)?)
                .context("the backup's end does not decode")?;
            read.media_missing = totals.media_missing;
            read.media_not_copied = totals.media_not_copied;
            if totals != read {
                bail!(
                    "the backup is damaged: its end counts {totals:?}, its entries hold {read:?}"
                );
            }
            ended = true;
        } else {
            bail!("the backup holds {path}: not a backup this version wrote");
        }
        progress.show(&read);
    }
    if !ended {
        bail!(
            "the backup is cut short (no {END} after {} pairs and {} media): it was not written \
             to its end",
            read.pairs,
            read.media
        );
    }
    visitor.end(&read)?;
    Ok(read)
}

fn read_small(entry: &mut impl Read, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    entry.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        bail!(
            "an entry of the backup is larger than {limit} bytes: not a backup this version wrote"
        );
    }
    Ok(bytes)
}

/// Hands each pair of `chunk` to `visitor` once its CRC is checked; returns how many.
fn read_chunk(chunk: &[u8], path: &str, visitor: &mut dyn Visitor) -> anyhow::Result<u64> {
    let damaged = || anyhow::anyhow!("the backup's {path} is damaged");
    let (pairs, crc) = chunk.split_last_chunk::<4>().ok_or_else(damaged)?;
    if crc32fast::hash(pairs) != u32::from_le_bytes(*crc) {
        return Err(damaged());
    }
    let take = |rest: &mut &[u8]| -> anyhow::Result<Vec<u8>> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(damaged)?;
        let len = u32::from_le_bytes(*len) as usize;
        let part = tail.get(..len).ok_or_else(damaged)?;
        *rest = &tail[len..];
        Ok(part.to_vec())
    };
    let (mut rest, mut count) = (pairs, 0);
    while !rest.is_empty() {
        let key = take(&mut rest)?;
        let value = take(&mut rest)?;
        visitor.pair(&key, &value)?;
        count += 1;
    }
    Ok(count)
}

/// Copies `bytes` to `out`, and fails unless their hash is `sha256`.
fn copy_checked(bytes: &mut dyn Read, sha256: &str, mut out: impl Write) -> anyhow::Result<u64> {
    let mut hash = Sha256::new();
    let mut buffer = vec![0; 256 << 10];
    let mut total = 0;
    loop {
        let n = bytes.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
        out.write_all(&buffer[..n])?;
        total += n as u64;
    }
    if hex::encode(hash.finalize()) != sha256 {
        bail!("the backup's media/{sha256} is damaged: its bytes have another hash");
    }
    Ok(total)
}

/// Reports the archive read so far on standard error, once per [`PROGRESS_EVERY`].
struct Progress {
    verb: &'static str,
    next: Instant,
    quiet: bool,
}

impl Progress {
    fn new(verb: &'static str, quiet: bool) -> Self {
        Self {
            verb,
            next: Instant::now() + PROGRESS_EVERY,
            quiet,
        }
    }

    fn show(&mut self, read: &Totals) {
        if self.quiet || Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + PROGRESS_EVERY;
        eprintln!(
            "{}: {} pairs, {} media so far",
            self.verb, read.pairs, read.media
        );
    }
}

/// Reads an archive through, checking it ([`read_archive`]): what `courier backup` does with
/// the archive a server streams it.
struct Checker;

impl Visitor for Checker {
    fn manifest(&mut self, _: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn pair(&mut self, _: &[u8], _: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }

    fn media(&mut self, sha256: &str, bytes: &mut dyn Read) -> anyhow::Result<()> {
        copy_checked(bytes, sha256, std::io::sink()).map(drop)
    }

    fn secret(&mut self, _: Vec<u8>) -> anyhow::Result<()> {
        Ok(())
    }

    fn end(&mut self, _: &Totals) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Writes a new data directory from an archive: the store and the media bytes in directories
/// of their own, moved into place once the archive has been read whole ([`restore`]).
struct Restorer<'a> {
    data_dir: PathBuf,
    media_dir: PathBuf,
    staging: &'a Staging,
    /// Where the media bytes are written until the archive has been read whole: a restore
    /// that fails leaves none in the media directory, where no record would keep them.
    media_staging: &'a Staging,
    import: Option<(StoreImport, u64)>,
    secret: Option<Vec<u8>>,
}

impl Visitor for Restorer<'_> {
    fn manifest(&mut self, ceiling: u64) -> anyhow::Result<()> {
        self.import = Some((StoreImport::create(&self.staging.path)?, ceiling));
        Ok(())
    }

    fn pair(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let (import, _) = self.import.as_mut().context("pairs before the manifest")?;
        import.insert(key, value)?;
        Ok(())
    }

    fn media(&mut self, sha256: &str, bytes: &mut dyn Read) -> anyhow::Result<()> {
        let staging = &self.media_staging.path;
        let mut file = tempfile::NamedTempFile::new_in(staging)
            .with_context(|| format!("writing media bytes in {}", staging.display()))?;
        copy_checked(bytes, sha256, &mut file)?;
        file.as_file().sync_all()?;
        file.persist(staging.join(sha256))?;
        Ok(())
    }

    fn secret(&mut self, secret: Vec<u8>) -> anyhow::Result<()> {
        // Read as `courier serve` reads it (`courier_core::auth::read_secret`): one it would
        // refuse to start with is refused here, before anything is in place.
        let text = std::str::from_utf8(&secret).map_or("", str::trim);
        if text.len() < MIN_SECRET_BYTES {
            bail!(
                "the backup's {SECRET} is damaged: {} bytes of text, fewer than the \
                 {MIN_SECRET_BYTES} a server takes",
                text.len()
            );
        }
        self.secret = Some(secret);
        Ok(())
    }

    fn end(&mut self, _: &Totals) -> anyhow::Result<()> {
        let (import, ceiling) = self.import.take().context("no manifest")?;
        import.finish(ceiling)?;
        let blobs = self.media_dir.join("blobs");
        for entry in std::fs::read_dir(&self.media_staging.path)? {
            let entry = entry?;
            if entry.file_name() == STAGING_MARK {
                continue;
            }
            std::fs::rename(entry.path(), blobs.join(entry.file_name()))
                .with_context(|| format!("moving media bytes into {}", blobs.display()))?;
        }
        sync_dir(&blobs)?;
        self.media_staging.unmark()?;
        std::fs::remove_dir(&self.media_staging.path)?;
        // The store last, once everything it needs is in place: a restore that fails or is
        // killed before leaves no store that a server would open (with a new secret, which
        // the tokens signed with the restored one would not pass).
        if let Some(secret) = self.secret.take() {
            let mut file = tempfile::NamedTempFile::new_in(&self.data_dir)?;
            file.write_all(&secret)?;
            file.as_file().sync_all()?;
            file.persist(self.data_dir.join(SECRET))
                .with_context(|| format!("placing {}", self.data_dir.join(SECRET).display()))?;
            sync_dir(&self.data_dir)?;
        }
        self.staging.unmark()?;
        std::fs::rename(&self.staging.path, self.data_dir.join(STORE_DIR))?;
        sync_dir(&self.data_dir)
    }
}

/// A directory a restore writes into before it moves what it wrote into place. It holds
/// [`STAGING_MARK`], locked for as long as the restore that made it runs: a restore that finds
/// one whose mark is not locked knows an earlier restore was cut short there (killed, or the
/// machine stopped) and clears it; a locked mark is a restore under way, and a directory with
/// something in it and no mark is someone else's: both are refused, never deleted.
struct Staging {
    path: PathBuf,
    /// Locked until dropped (or the process ends, however it ends).
    _mark: std::fs::File,
}

/// The file that marks a directory as a restore's staging ([`Staging`]).
const STAGING_MARK: &str = "courier-restore.lock";

impl Staging {
    /// Makes `path` (or takes an empty directory there), or takes over and empties the one an
    /// earlier restore cut short left there, saying so on standard error.
    fn claim(path: &Path) -> anyhow::Result<Self> {
        use std::io::ErrorKind;
        match courier_core::dirs::create_private(path) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("creating {}", path.display()));
            }
            _ => {}
        }
        let mut open = std::fs::OpenOptions::new();
        open.write(true);
        let mark = match open.open(path.join(STAGING_MARK)) {
            Err(e) if e.kind() == ErrorKind::NotFound && is_empty_dir(path)? => {
                open.create(true).open(path.join(STAGING_MARK))
            }
            opened => opened,
        };
        let mark = match mark {
            Ok(mark) => mark,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                bail!(
                    "{} is in the way, and is not what a restore left (it holds no \
                     {STAGING_MARK}): move it away, then restore again",
                    path.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        match mark.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "another `courier restore` is writing into {}: let it end (or stop it), then \
                 restore again",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let mut cleared = false;
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_name() == STAGING_MARK {
                continue;
            }
            let removed = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
            removed.with_context(|| format!("clearing {}", entry.path().display()))?;
            cleared = true;
        }
        if cleared {
            eprintln!(
                "cleared {}: an earlier restore was cut short there",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_owned(),
            _mark: mark,
        })
    }

    /// Removes the mark, before what the directory holds is moved into place (the lock is
    /// held until the end all the same).
    fn unmark(&self) -> anyhow::Result<()> {
        let mark = self.path.join(STAGING_MARK);
        std::fs::remove_file(&mark).with_context(|| format!("removing {}", mark.display()))
    }
}

fn is_empty_dir(path: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Where a restore into `data_dir` writes the store before it moves it into place.
fn store_staging(data_dir: &Path) -> PathBuf {
    data_dir.join(format!("{STORE_DIR}.restoring"))
}

/// Refuses to open a store in `data_dir` where a restore was cut short, or is under way: the
/// server would start with an empty store (and make a new token secret), and the restore, run
/// again, would be refused for the store it made.
pub fn check_no_restore_left(data_dir: &Path) -> anyhow::Result<()> {
    let staging = store_staging(data_dir);
    if staging.exists() && !holds_store(&data_dir.join(STORE_DIR)) {
        bail!(
            "a `courier restore` into {} did not finish ({} is there, and no store): run the \
             restore again (it clears what the first left), or delete {} to start with an empty \
             store",
            data_dir.display(),
            staging.display(),
            staging.display()
        );
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Writes the data directory `data_dir` (and the media directory `media_dir`) from the
/// archive `input`. Refused when `data_dir` already holds a store; nothing of the store or
/// the media is in place unless the whole archive was read and checked (module documentation).
pub fn restore(
    input: impl Read,
    data_dir: &Path,
    media_dir: &Path,
    quiet: bool,
) -> anyhow::Result<Totals> {
    let store = data_dir.join(STORE_DIR);
    if std::fs::read_dir(&store).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "{} already holds a store: restore into a new data directory, or move that one away \
             first",
            data_dir.display()
        );
    }
    for dir in [data_dir, media_dir, &media_dir.join("blobs")] {
        courier_core::dirs::create_private(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if store.exists() {
        std::fs::remove_dir(&store).with_context(|| format!("removing {}", store.display()))?;
    }
    // Each removed if the restore fails: it is this restore's.
    let staging = Staging::claim(&store_staging(data_dir))?;
    let restored = Staging::claim(&media_dir.join("restoring")).and_then(|media_staging| {
        let mut restorer = Restorer {
            data_dir: data_dir.to_owned(),
            media_dir: media_dir.to_owned(),
            staging: &staging,
            media_staging: &media_staging,
            import: None,
            secret: None,
        };
        let restored = read_archive(input, &mut restorer, &mut Progress::new("restoring", quiet));
        drop(restorer);
        if restored.is_err() {
            let _ = std::fs::remove_dir_all(&media_staging.path);
        }
        restored
    });
    if restored.is_err() {
        let _ = std::fs::remove_dir_all(&staging.path);
    }
    restored
}

/// Serves backups of `engine` on the socket in `sources.data_dir` ([`SOCKET`]) until `cancel`;
/// a backup under way then ends with an error (module documentation). A socket that cannot be
/// made (a data directory whose path is too long for one) leaves online backups off, with a
/// warning: the server runs on.
pub async fn serve(engine: Arc<EmbeddedEngine>, sources: Sources, cancel: CancellationToken) {
    let path = sources.data_dir.join(SOCKET);
    let listener = match bind_private(&path) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "online backups are off: `courier backup` needs the server stopped");
            return;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicBool::new(false));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => break,
        };
        let stream = match accepted.and_then(|(stream, _)| stream.into_std()) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a backup failed");
                // Out of file descriptors, say: the connection stays in the backlog, and
                // accepting again at once would spin.
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_RETRY) => continue,
                    () = cancel.cancelled() => break,
                }
            }
        };
        let (engine, sources, stop, busy) =
            (engine.clone(), sources.clone(), stop.clone(), busy.clone());
        let started = std::thread::Builder::new()
            .name("courier-backup".into())
            .spawn(move || send_backup(&engine, &sources, stream, &stop, &busy));
        if let Err(e) = started {
            tracing::warn!(error = %e, "starting a backup failed");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&path);
}

/// Binds the socket at `path` where only this user can connect, at any moment: made in a
/// directory of its own that only this user may enter (a data directory that existed keeps
/// its mode, which may let others in), its mode set, then moved to `path` (a stale socket of an
/// earlier process replaced).
fn bind_private(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = path.parent().unwrap_or(Path::new("."));
    // Mode 0700. Its path no longer than `path`'s ([`SOCKET`]'s name): a data directory whose
    // socket's path fits has it.
    let private = tempfile::Builder::new()
        .prefix(".b")
        .rand_bytes(4)
        .tempdir_in(parent)
        .with_context(|| format!("making a directory in {}", parent.display()))?;
    let made = private.path().join("sock");
    let listener = tokio::net::UnixListener::bind(&made)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&made, path))
        .with_context(|| format!("placing {}", path.display()))?;
    Ok(listener)
}

/// One backup, on its own thread: a status line (`OK`, or `ERR` and why), then the archive.
fn send_backup(
    engine: &EmbeddedEngine,
    sources: &Sources,
    stream: std::os::unix::net::UnixStream,
    stop: &AtomicBool,
    busy: &AtomicBool,
) {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stream);
    let sent = (|| -> anyhow::Result<Totals> {
        out.get_ref().set_nonblocking(false)?;
        out.get_ref().set_write_timeout(Some(STALL_LIMIT))?;
        if busy.swap(true, Ordering::AcqRel) {
            bail!("a backup is already under way; try again once it has ended");
        }
        let _idle = Idle(busy);
        lower_priority();
        let snapshot = engine.snapshot()?;
        out.write_all(b"OK\n")?;
        write_archive(&snapshot, sources, &mut out, stop, &mut |_| {})
    })();
    match sent {
        Ok(totals) => tracing::info!(
            pairs = totals.pairs,
            media = totals.media,
            media_missing = totals.media_missing,
            "backup sent"
        ),
        Err(e) => {
            let e = format!("{e:#}");
            tracing::warn!(error = %e, "backup failed");
            // Seen by the reader only when the archive had not begun.
            let _ = writeln!(out, "ERR {e}");
        }
    }
}

/// Marks the server free for the next backup when dropped.
struct Idle<'a>(&'a AtomicBool);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Puts the calling thread at the lowest CPU priority, the store's flushes' (Linux, where a
/// thread's nice value is its own), so that a backup takes the cores the roles leave.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(None, courier_store::embedded::BACKGROUND_NICE)
    {
        tracing::debug!(error = %e, "a backup keeps the server's priority");
    }
}

/// `courier backup`: a copy of a `courier serve` data directory, from the running server or,
/// when none answers, from the store itself.
#[derive(clap::Args)]
pub struct BackupArgs {
    /// The server's data directory.
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
    data_dir: PathBuf,
    /// The archive to write (`-`: standard output). A file is written beside it and moved into
    /// place once whole, so a backup that fails leaves an earlier one as it was.
    #[arg(long)]
    to: PathBuf,
    /// With no server running: the directory of the media bytes, the server's `--media-dir`
    /// (refused if it is not a directory; default: `media` in the data directory, none copied
    /// if it does not exist). A running server copies its own.
    #[arg(long, env = "COURIER_MEDIA_DIR")]
    media_dir: Option<PathBuf>,
    /// No progress on standard error.
    #[arg(long)]
    quiet: bool,
}

/// `courier restore`: a new data directory from a backup.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The archive `courier backup` wrote (`-`: standard input).
    #[arg(long)]
    from: PathBuf,
    /// The data directory to write: it must not hold a store.
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
    data_dir: PathBuf,
    /// Where to put the media bytes: the `--media-dir` the restored server will have (default:
    /// `media` in the data directory).
    #[arg(long, env = "COURIER_MEDIA_DIR")]
    media_dir: Option<PathBuf>,
    /// No progress on standard error.
    #[arg(long)]
    quiet: bool,
}

pub fn run_backup(args: &BackupArgs) -> anyhow::Result<()> {
    let mut out = Output::create(&args.to)?;
    let socket = args.data_dir.join(SOCKET);
    let (totals, from) = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => (receive(stream, &mut out, args.quiet)?, "the running server"),
        // No server answers: none runs, a stopped one left its socket, or the data
        // directory's path is too long for a socket, where a server takes no online backups
        // (`serve`). Opening the store tells whether a server holds it.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::InvalidInput
            ) =>
        {
            (
                copy_stopped(args, &mut out)?,
                "the store (no server running)",
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", socket.display()));
        }
    };
    out.finish()?;
    eprintln!(
        "backup of {} from {from} written to {}: {} pairs, {} media{}{}",
        args.data_dir.display(),
        args.to.display(),
        totals.pairs,
        totals.media,
        match (totals.media_not_copied, totals.media_missing) {
            (true, _) => " (the store keeps media, and no media bytes are in the backup: no \
                          media directory was there to copy them from; those in a bucket are \
                          the bucket's to back up, and with no server running --media-dir \
                          names the server's)"
                .to_owned(),
            (false, 0) => String::new(),
            (false, n) => format!(
                " ({n} kept by the store were gone: their records are swept after a restore)"
            ),
        },
        if totals.secret {
            ", the token secret"
        } else {
            ""
        },
    );
    Ok(())
}

/// Reads the archive a running server sends on `stream` into `out`, checking it as it goes.
fn receive(
    stream: std::os::unix::net::UnixStream,
    out: &mut Output,
    quiet: bool,
) -> anyhow::Result<Totals> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, stream);
    let mut status = String::new();
    (&mut input).take(64 << 10).read_line(&mut status)?;
    match status.trim_end() {
        "OK" => {}
        refused => bail!(
            "the server refused the backup: {}",
            refused
                .strip_prefix("ERR ")
                .unwrap_or("it closed the connection")
        ),
    }
    let mut tee = Tee { input, out };
    let totals = read_archive(
        &mut tee,
        &mut Checker,
        &mut Progress::new("backing up", quiet),
    )
    .context("the server's archive ended early or damaged (its log says why, if it stopped)")?;
    // The archive's closing blocks, after the entries.
    std::io::copy(&mut tee, &mut std::io::sink())?;
    Ok(totals)
}

/// A reader that writes what it reads to `out`.
struct Tee<'a, R> {
    input: R,
    out: &'a mut Output,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The store copied with no server running: it is opened here (and refused if a server holds
/// it after all).
fn copy_stopped(args: &BackupArgs, out: &mut Output) -> anyhow::Result<Totals> {
    let store = args.data_dir.join(STORE_DIR);
    if !holds_store(&store) {
        bail!(
            "no store at {}: is --data-dir the server's?",
            store.display()
        );
    }
    let default_media_dir = args.data_dir.join("media");
    let media_dir = match &args.media_dir {
        // Named, it is where the media are: one that is not there is a mistake, which would
        // otherwise be a backup without them.
        Some(dir) if !dir.is_dir() => bail!(
            "--media-dir {} is not a directory: give the server's --media-dir",
            dir.display()
        ),
        Some(dir) => Some(dir.clone()),
        // A server with media in a bucket, or none uploaded yet, has none here.
        None => default_media_dir
            .is_dir()
            .then_some(default_media_dir.clone()),
    };
    let engine = EmbeddedEngine::open(&store)?;
    let sources = Sources {
        data_dir: args.data_dir.clone(),
        media_dir,
    };
    let mut progress = Progress::new("backing up", args.quiet);
    let snapshot = engine.snapshot()?;
    let totals = write_archive(
        &snapshot,
        &sources,
        out,
        &AtomicBool::new(false),
        &mut |totals| progress.show(totals),
    )?;
    Ok(totals)
}

pub fn run_restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let media_dir = args
        .media_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("media"));
    let input: Box<dyn Read> = if args.from.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&args.from)
                .with_context(|| format!("opening {}", args.from.display()))?,
        )
    };
    let totals = restore(
        std::io::BufReader::with_capacity(1 << 20, input),
        &args.data_dir,
        &media_dir,
        args.quiet,
    )?;
    eprintln!(
        "restored {} pairs and {} media into {}{}",
        totals.pairs,
        totals.media,
        args.data_dir.display(),
        if totals.secret {
            ", with the token secret"
        } else {
            ""
        },
    );
    Ok(())
}

/// Where `courier backup` writes: standard output, or a file beside the archive's path moved
/// over it once whole.
enum Output {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File {
        file: std::io::BufWriter<tempfile::NamedTempFile>,
        path: PathBuf,
    },
}

impl Output {
    fn create(path: &Path) -> anyhow::Result<Self> {
        if path.as_os_str() == "-" {
            return Ok(Self::Stdout(std::io::BufWriter::new(std::io::stdout())));
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // Readable by this user alone, as the data directory is: it holds every message.
        let file = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .suffix(PARTIAL_SUFFIX)
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        file.as_file()
            .try_lock()
            .with_context(|| format!("locking {}", file.path().display()))?;
        remove_backups_cut_short(dir);
        Ok(Self::File {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            path: path.to_owned(),
        })
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Self::Stdout(mut out) => Ok(out.flush()?),
            Self::File { file, path } => {
                let file = file.into_inner().map_err(|e| e.into_error())?;
                file.as_file().sync_all()?;
                file.persist(&path)
                    .with_context(|| format!("moving the backup to {}", path.display()))?;
                Ok(())
            }
        }
    }
}

/// How the file a backup writes beside `--to` is named: `.courier-backup-XXXXXX.partial`. It is
/// locked while the backup runs.
const PARTIAL_PREFIX: &str = ".courier-backup-";
const PARTIAL_SUFFIX: &str = ".partial";

/// Removes from `dir` the files of backups that were cut short there (killed, or the machine
/// stopped): named as [`Output`] names them, unlocked (no backup is writing them), and empty or
/// beginning as an archive does. Each is said on standard error; one that cannot be removed
/// too, and the backup goes on.
fn remove_backups_cut_short(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with(PARTIAL_PREFIX) && n.ends_with(PARTIAL_SUFFIX));
        if !ours || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        let mut start = Vec::new();
        if (&file)
            .take(MANIFEST.len() as u64)
            .read_to_end(&mut start)
            .is_err()
            || !MANIFEST.as_bytes().starts_with(&start)
        {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => eprintln!(
                "removed {}: a backup cut short left it",
                entry.path().display()
            ),
            Err(e) => eprintln!(
                "{} is what a backup cut short left; it could not be removed: {e}",
                entry.path().display()
            ),
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Stdout(out) => out.write(buf),
            Self::File { file, .. } => file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Stdout(out) => out.flush(),
            Self::File { file, .. } => file.flush(),
        }
    }
}
