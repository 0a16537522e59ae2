//! `--config FILE` (or `COURIER_CONFIG`): a subcommand's flags from a TOML file, for a
//! ConfigMap mounted into a pod or a file under `/etc` for systemd.
//!
//! The file is one flat table whose keys are the subcommand's long flag names, as on the
//! command line (`listen`, `data-dir`, `max-sends-in-flight`), so `--help` and
//! `docs/operations.md` document every key. Values are typed naturally: strings, integers,
//! `true`/`false` for a switch, and arrays for a flag that takes a list (`roles = ["gateway",
//! "chat"]`). A flag on the command line wins over its environment variable, which wins over
//! the file, which wins over the default.
//!
//! The file is not parsed into the configuration here: its keys become flags, given to clap
//! as the command line would give them, so that clap's own parsers and checks apply and its
//! messages name the flag. The command line and the environment are parsed once to find the
//! file and which flags they already set (`ArgMatches::value_source`); every key of the file
//! whose flag they did not set is appended as `--key=value`, and the whole is parsed again.
//!
//! Any subcommand with a `--config` flag (`serve`, `node`, `store-node`) takes a file. What
//! the file gets wrong is refused with clap's exit code (2), naming the file, the line and the
//! key: a file that cannot be read, is larger than 1 MiB or is not TOML, a key that is no flag
//! of the subcommand (with the closest one, or the subcommand it belongs to), a table, an
//! array for a flag that takes one value, `config` itself, and any value clap refuses. A
//! secret's value (a flag whose variable's value `--help` hides, such as `--jwt-secret`) is
//! never repeated in a message.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, Parser};
use std::ffi::OsString;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use toml_edit::{Document, Item, Value};

/// The id of the flag that names the file (`ConfigFileArgs::config`).
const CONFIG: &str = "config";

/// What a secret's value reads as in a message.
const HIDDEN: &str = "(hidden)";

/// The largest configuration file read: one setting every flag is a few KiB, and a path to
/// something else (`/dev/zero`, a log) is refused instead of read into memory whole.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Parses the process's command line into `P`, with the flags of the `--config` file if one is
/// given; on an error, prints it and exits with code 2, as clap does.
pub fn parse<P: Parser>() -> P {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] from `args` (the program's name first), returning the error.
pub fn try_parse_from<P, I, T>(args: I) -> Result<P, clap::Error>
where
    P: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // The command line and the environment alone, to find the file. Leniently: a flag the file
    // is to give (`--roles`, required) is missing yet. The last parse below is strict, and
    // reports whatever is wrong with the command line as it always did.
    let Ok(given) = P::command().ignore_errors(true).try_get_matches_from(&args) else {
        return P::try_parse_from(args);
    };
    let Some((name, given)) = given.subcommand() else {
        return P::try_parse_from(args);
    };
    let Some(path) = given.try_get_one::<PathBuf>(CONFIG).ok().flatten() else {
        return P::try_parse_from(args);
    };
    let mut command = P::command();
    command.build();
    let file = FileFlags::read(&command, name, given, path)?;
    let mut all = args;
    all.extend(file.args.iter().cloned());
    P::try_parse_from(all).map_err(|e| file.blame(e))
}

/// A flag a configuration file gives to clap.
struct Given {
    /// Its long name.
    long: String,
    /// The key as the file spells it (an alias, perhaps).
    key: String,
    line: usize,
    /// The values it gives, as the command line would.
    values: Vec<String>,
}

/// The flags a configuration file gives, as clap takes them from a command line.
struct FileFlags {
    path: PathBuf,
    /// `--key=value` for every key whose flag neither the command line nor the environment set.
    args: Vec<OsString>,
    /// Each flag the file gives to clap (those in `args`).
    given: Vec<Given>,
    /// The secrets' values in the file, never to be shown.
    secrets: Vec<String>,
}

impl FileFlags {
    /// Reads the file at `path` for subcommand `name` of `command` (built), `given` its
    /// command line's and environment's matches.
    fn read(
        command: &Command,
        name: &str,
        given: &ArgMatches,
        path: &Path,
    ) -> Result<FileFlags, clap::Error> {
        let shown = path.display();
        let text = read_text(path).map_err(|e| {
            error(
                ErrorKind::Io,
                format!("the configuration file {shown} (--config) cannot be read: {e}"),
            )
        })?;
        let document = Document::parse(text.as_str()).map_err(|e| {
            // The message alone: toml's rendering quotes the line, which may hold a secret.
            let at = e
                .span()
                .map(|span| {
                    let (line, column) = line_and_column(&text, span.start);
                    format!(", line {line}, column {column}")
                })
                .unwrap_or_default();
            let message = e.message().trim().replace('\n', "; ");
            error(
                ErrorKind::Format,
                format!("{shown}{at}: not TOML: {message}"),
            )
        })?;
        let subcommand = command
            .find_subcommand(name)
            .ok_or_else(|| error(ErrorKind::InvalidSubcommand, format!("no `{name}`")))?;
        let mut file = FileFlags {
            path: path.to_owned(),
            args: Vec::new(),
            given: Vec::new(),
            secrets: Vec::new(),
        };
        let table = document.as_table();
        for (key, item) in table.iter() {
            let line = table
                .key(key)
                .and_then(|k| k.span())
                .map_or(0, |span| line_and_column(&text, span.start).0);
            let refuse = |why: String| {
                error(
                    ErrorKind::InvalidValue,
                    format!("{shown}, line {line}: {why}"),
                )
            };
            if key == CONFIG {
                return Err(refuse(format!(
                    "`{CONFIG}` names the file itself: give it as --config or COURIER_CONFIG"
                )));
            }
            // A section (`[media]`, `a.b = 1`) before the name: none is a flag.
            let Item::Value(value) = item else {
                return Err(refuse(format!(
                    "`{key}`: a table is not a value (the file is one flat table of \
                     `flag = value` lines, without sections)"
                )));
            };
            let Some(arg) = flag(subcommand, key) else {
                return Err(refuse(unknown(command, name, key)));
            };
            let long = arg.get_long().unwrap_or(key);
            if arg.is_hide_env_values_set() {
                collect_secrets(value, &mut file.secrets);
            }
            let values =
                flag_values(&text, arg, value).map_err(|why| refuse(format!("`{key}` {why}")))?;
            let id = arg.get_id().as_str();
            let set = matches!(
                given.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if set {
                continue;
            }
            file.args.extend(values.iter().map(|value| match value {
                Some(value) => OsString::from(format!("--{long}={value}")),
                None => OsString::from(format!("--{long}")),
            }));
            file.given.push(Given {
                long: long.to_owned(),
                key: key.to_owned(),
                line,
                values: values.into_iter().flatten().collect(),
            });
        }
        Ok(file)
    }

    /// `e`, from the parse with the file's flags, prefixed with the file, line and key when it
    /// is about a flag the file gave, and without the file's secrets.
    fn blame(&self, e: clap::Error) -> clap::Error {
        if !e.use_stderr() {
            return e;
        }
        // Only what the file gave is blamed on it: a flag the command line or the environment
        // set is not taken from the file, and a refused value must be one the file gave (should
        // the lenient parse have missed the flag on the command line).
        let refused = match e.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(value)) => Some(value.as_str()),
            _ => None,
        };
        let named = [ContextKind::InvalidArg, ContextKind::PriorArg]
            .into_iter()
            .filter_map(|kind| match e.get(kind) {
                Some(ContextValue::String(arg)) => Some(arg.clone()),
                Some(ContextValue::Strings(args)) => args.first().cloned(),
                _ => None,
            })
            .find_map(|arg| {
                let long = arg.strip_prefix("--")?.split([' ', '=']).next()?.to_owned();
                // The last: a flag given twice (by its name and an alias) is refused at the second.
                self.given.iter().rfind(|given| {
                    given.long == long
                        && refused.is_none_or(|refused| {
                            given.values.iter().any(|value| value.contains(refused))
                        })
                })
            });
        let Some(Given { key, line, .. }) = named else {
            return self.hide_secrets(e);
        };
        let message = e.render().to_string();
        let message = message.strip_prefix("error: ").unwrap_or(&message);
        let message = message.split("\n\n").next().unwrap_or(message).trim_end();
        let message = format!("{}, line {line}: `{key}`: {message}", self.path.display());
        error(e.kind(), self.hidden(message))
    }

    /// `e` as it is, unless it repeats a secret of the file.
    fn hide_secrets(&self, e: clap::Error) -> clap::Error {
        let message = e.render().to_string();
        if !self.secrets.iter().any(|secret| message.contains(secret)) {
            return e;
        }
        let message = message.strip_prefix("error: ").unwrap_or(&message);
        error(e.kind(), self.hidden(message.trim_end().to_owned()))
    }

    fn hidden(&self, mut message: String) -> String {
        for secret in &self.secrets {
            message = message.replace(secret.as_str(), HIDDEN);
        }
        message
    }
}

/// The text of the file at `path`, up to [`MAX_FILE_BYTES`].
fn read_text(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes: not a configuration file"),
        ));
    }
    Ok(text)
}

/// An error clap prints and exits on with its code for a usage error (2).
fn error(kind: ErrorKind, message: String) -> clap::Error {
    clap::Error::raw(kind, format!("{message}\n"))
}

/// The flag of `subcommand` whose long name (or one of its aliases) is `key`; not `--help`
/// nor `--version`, which are no settings.
fn flag<'a>(subcommand: &'a Command, key: &str) -> Option<&'a Arg> {
    subcommand.get_arguments().find(|arg| {
        let setting = !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        );
        let named = arg.get_long() == Some(key)
            || arg
                .get_all_aliases()
                .is_some_and(|aliases| aliases.contains(&key));
        setting && named
    })
}

/// Why `key` is not a flag of `courier NAME`: the subcommands it is a flag of, or the closest
/// flag of this one.
fn unknown(command: &Command, name: &str, key: &str) -> String {
    let elsewhere: Vec<String> = command
        .get_subcommands()
        .filter(|other| other.get_name() != name && flag(other, CONFIG).is_some())
        .filter(|other| flag(other, key).is_some())
        .map(|other| format!("`courier {}`", other.get_name()))
        .collect();
    if !elsewhere.is_empty() {
        return format!(
            "`{key}` is a flag of {}, not of `courier {name}`",
            elsewhere.join(" and ")
        );
    }
    let closest = command
        .find_subcommand(name)
        .into_iter()
        .flat_map(Command::get_arguments)
        .filter_map(Arg::get_long)
        .filter(|long| *long != "help" && *long != CONFIG)
        .map(|long| (strsim::levenshtein(key, long), long))
        .min();
    match closest {
        Some((distance, long)) if distance <= 2.max(key.len() / 3) => format!(
            "`{key}` is not a flag of `courier {name}`: did you mean `{long}`? (keys are the \
             flags' long names, as `courier {name} --help` lists them)"
        ),
        _ => format!(
            "`{key}` is not a flag of `courier {name}` (keys are the flags' long names, as \
             `courier {name} --help` lists them)"
        ),
    }
}

/// `value` for flag `arg` as the command line gives it: a value per time the flag is given
/// (`None` for a switch, given without one); the error says why not.
fn flag_values(text: &str, arg: &Arg, value: &Value) -> Result<Vec<Option<String>>, &'static str> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match value {
            Value::Boolean(on) if *on.value() => Ok(vec![None]),
            Value::Boolean(_) => Ok(Vec::new()),
            _ => Err("is a switch: true or false"),
        };
    }
    match value {
        Value::Array(items) => {
            let items = items
                .iter()
                .map(|item| scalar(text, item))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(delimiter) = arg.get_value_delimiter() {
                if items.is_empty() {
                    return Ok(Vec::new());
                }
                Ok(vec![Some(items.join(&delimiter.to_string()))])
            } else if matches!(arg.get_action(), ArgAction::Append) {
                Ok(items.into_iter().map(Some).collect())
            } else {
                Err("takes one value, not an array")
            }
        }
        _ => Ok(vec![Some(scalar(text, value)?)]),
    }
}

/// A string, integer, float, boolean or date-time as its text on a command line (a float and a
/// date-time as written, for clap to take or refuse).
fn scalar(text: &str, value: &Value) -> Result<String, &'static str> {
    let written = |span: Option<std::ops::Range<usize>>| {
        span.and_then(|span| text.get(span))
            .map(str::to_owned)
            .ok_or("has a value that cannot be read back")
    };
    match value {
        Value::String(s) => Ok(s.value().clone()),
        Value::Integer(i) => Ok(i.value().to_string()),
        Value::Boolean(b) => Ok(b.value().to_string()),
        Value::Float(f) => written(f.span()),
        Value::Datetime(d) => written(d.span()),
        Value::Array(_) => Err("has an array in an array: give one array of values"),
        Value::InlineTable(_) => Err("has a table for a value: give a string, number or array"),
    }
}

/// The strings of a secret's value, to keep out of messages.
fn collect_secrets(value: &Value, secrets: &mut Vec<String>) {
    match value {
        Value::String(s) if !s.value().is_empty() => secrets.push(s.value().clone()),
        Value::Array(items) => items.iter().for_each(|item| collect_secrets(item, secrets)),
        _ => {}
    }
}

/// The line and column (from 1, in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeConfig;
    use crate::node::{NodeArgs, Role};
    use crate::{Cli, Command as Subcommand, LogFormat};

    /// A configuration file holding `text`, in a directory of its own.
    struct File {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn file(text: &str) -> File {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("courier.toml");
        std::fs::write(&path, text).unwrap();
        File { _dir: dir, path }
    }

    /// `courier ARGS... --config FILE` with `text` in the file.
    fn parsed(args: &[&str], text: &str) -> Result<Cli, clap::Error> {
        let file = file(text);
        let path = file.path.to_str().unwrap();
        let args = [&["courier"][..], args, &["--config", path]].concat();
        try_parse_from(args)
    }

    fn serve(text: &str) -> ServeConfig {
        serve_with(&[], text)
    }

    fn serve_with(args: &[&str], text: &str) -> ServeConfig {
        let args = [&["serve"][..], args].concat();
        match parsed(&args, text).map(|cli| cli.command) {
            Ok(Subcommand::Serve(config)) => config,
            Ok(_) => panic!("not serve"),
            Err(e) => panic!("{e}"),
        }
    }

    fn node(text: &str) -> NodeArgs {
        match parsed(&["node"], text).map(|cli| cli.command) {
            Ok(Subcommand::Node(args)) => args,
            Ok(_) => panic!("not node"),
            Err(e) => panic!("{e}"),
        }
    }

    /// The message of the error `courier ARGS --config FILE` (with `text`) exits on, which is
    /// clap's usage error (exit code 2).
    fn refused(args: &[&str], text: &str) -> String {
        let Err(e) = parsed(args, text) else {
            panic!("{text:?} was taken");
        };
        assert_eq!(e.exit_code(), 2, "{e}");
        e.render().to_string()
    }

    /// The file's keys are the flags' long names, its values typed naturally; a flag the file
    /// does not give keeps its default.
    #[test]
    fn a_files_keys_set_their_flags_and_the_others_keep_their_defaults() {
        let config = serve(
            r#"
                # A comment.
                listen = "127.0.0.1:9999"
                data-dir = "/var/lib/courier"
                shards = 1_024
                max-sends-in-flight = 10
                drain-window = "30s"
                push-include-text = true
                webhook-url = "https://example.com/push"
            "#,
        );
        assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.data_dir, Path::new("/var/lib/courier"));
        assert_eq!(config.shards, 1024);
        assert_eq!(config.max_sends_in_flight, 10);
        assert_eq!(
            config.drain_window,
            Some(std::time::Duration::from_secs(30))
        );
        assert!(config.push.push_include_text);
        assert_eq!(
            config.push.push_webhook_url.as_deref(),
            Some("https://example.com/push")
        );
        // Not in the file: the default.
        assert_eq!(config.node_id, "local");
        assert_eq!(config.commit_max_appends, 512);
        // Past TOML's integers, a string, taken as the command line takes it.
        let unbounded = serve("max-sends-in-flight = \"18446744073709551615\"");
        assert_eq!(unbounded.max_sends_in_flight, u64::MAX);
        // A switch set false is off, as without the file.
        assert!(!serve("push-include-text = false").push.push_include_text);
    }

    /// A flag on the command line wins over the file's key (whichever comes first), the file
    /// over the default; a global flag (`--log-format`) may be in the file too.
    #[test]
    fn a_flag_on_the_command_line_wins_over_the_file() {
        let text = "shards = 4\nnode-id = \"from-file\"\nlog-format = \"json\"";
        let config = serve_with(&["--shards", "8"], text);
        assert_eq!(config.shards, 8);
        assert_eq!(config.node_id, "from-file");
        let cli = parsed(&["serve"], text).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        for args in [
            &["--log-format", "text", "serve"][..],
            &["serve", "--log-format=text"],
        ] {
            let cli = parsed(args, text).unwrap();
            assert_eq!(cli.log_format, LogFormat::Text, "{args:?}");
        }
    }

    /// A flag `courier node` requires (`--roles`) may come from the file alone, as an array or
    /// as the command line's comma-separated text; `courier store-node` takes a file too.
    #[test]
    fn a_required_flag_and_a_list_may_come_from_the_file() {
        let roles = |text| node(text).roles;
        let expected = vec![Role::Gateway, Role::Chat];
        assert_eq!(roles(r#"roles = ["gateway", "chat"]"#), expected);
        assert_eq!(roles(r#"roles = "gateway,chat""#), expected);
        let args = node("roles = [\"sequencer\"]\nstore = \"remote\"\nnode-id = \"n1\"");
        assert_eq!(args.serve.node_id, "n1");
        // Without --roles anywhere, clap's own message.
        let message = refused(&["node"], "node-id = \"n1\"");
        assert!(message.contains("--roles"), "{message}");

        let Ok(Subcommand::StoreNode(store)) =
            parsed(&["store-node"], "listen = \"127.0.0.1:7401\"").map(|cli| cli.command)
        else {
            panic!("store-node");
        };
        assert_eq!(store.listen.to_string(), "127.0.0.1:7401");
    }

    /// A file that cannot be read, or that is not TOML, is refused naming the file (and the
    /// line and column of the mistake), without quoting the line (it may hold a secret).
    #[test]
    fn a_missing_file_or_one_that_is_not_toml_is_refused() {
        let args = ["courier", "serve", "--config", "/nonexistent/courier.toml"];
        let e = try_parse_from::<Cli, _, _>(args).err().expect("refused");
        assert_eq!(e.exit_code(), 2);
        let message = e.to_string();
        assert!(message.contains("/nonexistent/courier.toml"), "{message}");
        assert!(message.contains("cannot be read"), "{message}");
        let args = ["courier", "serve", "--config", "/dev/zero"];
        let message = try_parse_from::<Cli, _, _>(args).err().expect("refused");
        assert!(message.to_string().contains("larger than"), "{message}");

        let message = refused(
            &["serve"],
            "shards = 4\njwt-secret = \"a-secret-that-never-ends-0123456789",
        );
        assert!(
            message.contains("courier.toml, line 2, column"),
            "{message}"
        );
        assert!(message.contains("not TOML"), "{message}");
        assert!(!message.contains("a-secret"), "{message}");
    }

    /// A key that is no flag of the subcommand is refused naming it, with the closest flag or
    /// the subcommand it belongs to; `config` names the file itself.
    #[test]
    fn an_unknown_key_or_another_subcommands_is_refused_naming_it() {
        let message = refused(&["serve"], "listen = \"127.0.0.1:0\"\nshard = 4");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("`shard`"), "{message}");
        assert!(message.contains("did you mean `shards`"), "{message}");

        let message = refused(&["serve"], "no-such-setting-at-all = 1");
        assert!(message.contains("`no-such-setting-at-all`"), "{message}");
        assert!(!message.contains("did you mean"), "{message}");

        let message = refused(&["serve"], "roles = [\"chat\"]");
        assert!(
            message.contains("`roles` is a flag of `courier node`, not of `courier serve`"),
            "{message}"
        );
        let message = refused(&["store-node"], "shards = 4");
        assert!(
            message.contains("`courier serve` and `courier node`"),
            "{message}"
        );

        let message = refused(&["serve"], "config = \"/etc/other.toml\"");
        assert!(message.contains("`config`"), "{message}");
        let message = refused(&["serve"], "help = true");
        assert!(message.contains("`help` is not a flag"), "{message}");
    }

    /// A value of the wrong kind is refused naming the file, the line, the key and the flag:
    /// a table, a float or a string where clap wants an integer, an array for one value, a
    /// switch that is not true or false.
    #[test]
    fn a_value_of_the_wrong_type_is_refused_naming_the_key() {
        for (text, key, why) in [
            (
                "[media]\nmedia-dir = \"/m\"",
                "media",
                "a table is not a value",
            ),
            (
                "shards = { count = 4 }",
                "shards",
                "has a table for a value",
            ),
            ("a.b = 1", "a", "a table is not a value"),
            (
                "listen = [\"127.0.0.1:1\", \"127.0.0.1:2\"]",
                "listen",
                "one value",
            ),
            (
                "push-include-text = \"yes\"",
                "push-include-text",
                "a switch",
            ),
            ("roles = [[\"chat\"]]", "roles", "an array in an array"),
        ] {
            let args: &[&str] = if key == "roles" {
                &["node"]
            } else {
                &["serve"]
            };
            let message = refused(args, text);
            assert!(message.contains(&format!("`{key}`")), "{text}: {message}");
            assert!(message.contains(why), "{text}: {message}");
        }
        // Clap's own parsers, its message prefixed with the file, the line and the key.
        for (text, flag) in [
            ("shards = 1.5", "--shards"),
            ("shards = -1", "--shards"),
            ("max-sends-in-flight = 0", "--max-sends-in-flight"),
            ("listen = 8080", "--listen"),
            ("store = \"postgres\"", "--store"),
            ("drain-window = 30", "--drain-window"),
        ] {
            let message = refused(&["serve"], &format!("\n{text}"));
            let key = text.split(' ').next().unwrap();
            let at = format!("courier.toml, line 2: `{key}`: ");
            assert!(message.contains(&at), "{text}: {message}");
            assert!(message.contains(flag), "{text}: {message}");
        }
    }

    /// A value the command line gets wrong is reported as the command line's, not the file's,
    /// when the file sets the same flag.
    #[test]
    fn a_wrong_flag_on_the_command_line_is_not_blamed_on_the_file() {
        let file = file("listen = \"127.0.0.1:0\"\nshards = 4");
        let path = file.path.to_str().unwrap();
        // After --config: the lenient first parse has read the file's name.
        let args = ["courier", "serve", "--config", path, "--shards", "many"];
        let e = try_parse_from::<Cli, _, _>(args).err().expect("refused");
        let message = e.render().to_string();
        assert!(message.contains("'many' for '--shards"), "{message}");
        assert!(!message.contains("courier.toml"), "{message}");
    }

    /// A secret's value (a flag whose variable `--help` hides) is never repeated in a message.
    #[test]
    fn a_secrets_value_is_not_shown_in_a_message() {
        let secret = "s3cr3t-value-for-the-webhook-signature!";
        let text = format!("push-webhook-secret = \"{secret}\"\nwebhook-secret = \"{secret}\"");
        let message = refused(&["serve"], &text);
        assert!(message.contains("line 2: `webhook-secret`"), "{message}");
        assert!(!message.contains(secret), "{message}");
    }
}
