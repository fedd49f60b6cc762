//! runc-style logging: `--log FILE` (default stderr), `--log-format text|json`, `--debug`.
//! JSON lines look like runc's (`{"level":"error","msg":"...","time":"..."}`): containerd's runc
//! shim reads the last error from that file.

use std::io::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

pub use cocoon_runtime::phase::{mark_start, phase};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct RuncLayer {
    out: Mutex<Box<dyn Write + Send>>,
    format: LogFormat,
    max: Level,
}

#[derive(Default)]
struct Message {
    msg: String,
    fields: Vec<(String, String)>,
}

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.msg = format!("{value:?}");
        } else {
            self.fields
                .push((field.name().to_owned(), format!("{value:?}")));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_owned();
        } else {
            self.fields
                .push((field.name().to_owned(), value.to_owned()));
        }
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// One log line in `format`.
pub fn line(
    format: LogFormat,
    level: &str,
    msg: &str,
    fields: &[(String, String)],
    time: &str,
) -> String {
    match format {
        LogFormat::Json => {
            let mut object = serde_json::Map::new();
            object.insert("level".into(), level.into());
            object.insert("msg".into(), msg.into());
            object.insert("time".into(), time.into());
            for (k, v) in fields {
                object.insert(k.clone(), v.clone().into());
            }
            serde_json::Value::Object(object).to_string()
        }
        LogFormat::Text => {
            let mut text = format!("time={time:?} level={level} msg={msg:?}");
            for (k, v) in fields {
                text.push_str(&format!(" {k}={v:?}"));
            }
            text
        }
    }
}

impl<S: Subscriber> Layer<S> for RuncLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = event.metadata().level();
        if *level > self.max {
            return;
        }
        let mut message = Message::default();
        event.record(&mut message);
        let time = crate::state::rfc3339(std::time::SystemTime::now());
        let text = line(
            self.format,
            level_name(level),
            &message.msg,
            &message.fields,
            &time,
        );
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// Installs the logger. Errors also go to stderr when a log file is used, so a person running
/// the CLI by hand sees them.
pub fn init(log: Option<&std::path::Path>, format: LogFormat, debug: bool) -> std::io::Result<()> {
    let max = if debug { Level::DEBUG } else { Level::WARN };
    let file_layer = match log {
        Some(path) => Some(RuncLayer {
            out: Mutex::new(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
            format,
            max,
        }),
        None => None,
    };
    let stderr_layer = RuncLayer {
        out: Mutex::new(Box::new(std::io::stderr())),
        format: LogFormat::Text,
        max: if log.is_some() { Level::ERROR } else { max },
    };
    let _ = tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_look_like_runcs() {
        let l = line(
            LogFormat::Json,
            "error",
            "container \"x\" does not exist",
            &[],
            "2024-01-01T00:00:00Z",
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
        assert_eq!(v["time"], "2024-01-01T00:00:00Z");
    }

    #[test]
    fn text_lines_quote_the_message() {
        let l = line(
            LogFormat::Text,
            "error",
            "a b",
            &[("id".into(), "c1".into())],
            "T",
        );
        assert_eq!(l, "time=\"T\" level=error msg=\"a b\" id=\"c1\"");
    }
}
