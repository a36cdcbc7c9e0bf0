//! Logs for operators reading `journalctl -u nk3-agent`: one line per event, with the node
//! (`host=`) and commit (`commit=`) in it.
//!
//! Under systemd with journald listening, entries are sent to the journal natively (see
//! [`init`]). Else, under systemd (`JOURNAL_STREAM` set), there are no colours and no
//! timestamps of our own
//! (the journal adds its own), and each line starts with its syslog priority (`<3>` error,
//! `<4>` warning, `<6>` info, `<7>` debug), which journald reads as the entry's priority.
//! In a terminal, lines carry the time and the level.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the subscriber for `level` and more severe. Under systemd with journald to
/// talk to, entries go to the journal natively, one entry per event (a diff is one), with
/// the node and commit as fields of their own: `journalctl -u nk3-agent
/// NK3_COMMIT=<12 characters>` lists one commit's story, `NK3_HOST=` one node's. Otherwise
/// logs go to stderr.
pub fn init(level: Level) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if journal {
        // The socket is checked when the layer is made: none (a container, a test), and the
        // stream below is used.
        if let Ok(layer) = tracing_journald::layer() {
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::util::SubscriberInitExt as _;
            use tracing_subscriber::Layer as _;
            let layer = layer
                .with_field_prefix(Some("NK3".into()))
                .with_syslog_identifier("nk3-agent".into())
                .with_filter(tracing_subscriber::filter::LevelFilter::from_level(level));
            tracing_subscriber::registry().with(layer).init();
            return;
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    if journal {
        builder.with_ansi(false).event_format(JournalFormat).init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(ansi).init();
    }
}

/// `<priority>message field=value…`, nothing else.
#[derive(Debug)]
struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        let mut text = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut text), event)?;
        // The node and commit come from the step's span.
        let mut fields = String::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>() {
                    if !f.is_empty() {
                        fields.push(' ');
                        fields.push_str(f);
                    }
                }
            }
        }
        // journald reads a stream line by line: each line of a message that has several (a
        // diff) carries the priority, the first the fields.
        for (i, line) in text.lines().enumerate() {
            write!(writer, "<{priority}>{line}")?;
            if i == 0 {
                write!(writer, "{fields}")?;
            }
            writeln!(writer)?;
        }
        Ok(())
    }
}
