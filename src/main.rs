//! The `mtad` command: run a node, check a configuration file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mtad::admin::client;
use mtad::notify;
use mtad::queue::ops::{Filter, Op, Selector};

/// Exit status for a configuration error (sysexits EX_CONFIG is 78, but
/// the contract is EX_USAGE-style 64 for "your input is wrong").
const EXIT_CONFIG: u8 = 64;
/// Exit status when the node cannot start or fails at run time.
const EXIT_FAILURE: u8 = 1;
/// Exit status of `ctl` when the node answered but is not in its cluster
/// (its join was refused, or has not succeeded yet).
const EXIT_NOT_IN_CLUSTER: u8 = 2;

#[derive(Parser)]
#[command(
    name = "mtad",
    version,
    about = "Clustered SMTP message-transfer daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the configuration `mtad run` uses without `--config`.
    Default,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (on the built-in default configuration without
    /// `--config`: see `mtad config default`).
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show configuration that is built in.
    Config {
        /// What to show.
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Remove this node's VIPs from their interfaces (systemd runs it
    /// after the daemon exits, however it exits).
    Release {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and report every error.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Print a credentials line (`user:argon2-hash`) for `[smtp.auth]
    /// credentials`, reading the password from the first line of stdin.
    Passwd {
        /// The user name.
        user: String,
    },
    /// Start a three-node demo cluster on loopback addresses with a built-in
    /// sink, stream mail to its VIP, kill the VIP's owner midway, restart
    /// it, and report.
    Demo {
        /// How many messages to send.
        #[arg(long, default_value_t = 200)]
        messages: u64,
        /// Keep the nodes' configurations and logs (removed otherwise,
        /// unless the demo failed).
        #[arg(long)]
        keep: bool,
        /// Hold all mail until the kill and delete the killed owner's
        /// data directory: what it acknowledged is delivered from the
        /// shadow copies on the other nodes.
        #[arg(long)]
        wipe: bool,
    },
    /// Talk to a running node's admin API.
    Ctl {
        /// The node's admin API.
        #[arg(long, global = true, default_value = "http://127.0.0.1:8025")]
        admin: String,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        /// A file holding the admin API's bearer token (`[admin]
        /// token_file` on the node).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// The node: version, uptime, queue counts, cluster role.
    Status,
    /// Cluster members with role, vote, state and incarnation.
    Nodes,
    /// Remove a dead member from the cluster (ask the leader).
    Evict {
        /// The member's name.
        name: String,
    },
    /// Resource groups: owner, epoch, status and the last transition.
    Groups,
    /// Move a group to a node gracefully (drain, stop, start there).
    Move {
        /// The group.
        group: String,
        /// The node's name.
        node: String,
    },
    /// Re-read the node's configuration file and apply what can change
    /// live (as SIGHUP does); an invalid file changes nothing.
    Reload,
    /// Drain a node: it answers new SMTP clients 421, hands its groups to
    /// other nodes and delivers or hands over its queue (`status` on it
    /// then says "drained").
    Drain {
        /// The node's name.
        node: String,
        /// End the drain instead.
        #[arg(long)]
        cancel: bool,
    },
    /// The queue: what waits, and what to do with it.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Per destination: messages, recipients, deferred, held, oldest,
    /// associations open and the last error (like qshape).
    Summary,
    /// Queued messages, oldest first, fetched page by page.
    List {
        /// Only messages for this destination (route name or domain).
        #[arg(long)]
        dest: Option<String>,
        /// Only messages in this state: active, deferred or held.
        #[arg(long)]
        state: Option<String>,
        /// Start after this queue id (as printed at the end of a page).
        #[arg(long)]
        after: Option<String>,
        /// At most this many messages (1 or more).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
    /// One message: envelope, recipients, attempts, last reply, headers.
    Show {
        /// Queue id.
        id: String,
    },
    /// Retry now what waits for a retry (all messages if none is named).
    Flush(Selection),
    /// Dispatch nothing for these messages until released (kept across
    /// restarts).
    Hold(Selection),
    /// Release held messages: they are dispatched at once.
    Release(Selection),
    /// Remove messages from the queue with no notice to anyone.
    Delete(Selection),
    /// Return messages to their senders with a DSN.
    Bounce(Selection),
}

/// Which messages an action applies to.
#[derive(clap::Args)]
struct Selection {
    /// Queue ids.
    ids: Vec<String>,
    /// Every message for this destination (route name or domain).
    #[arg(long)]
    dest: Option<String>,
    /// Every message in this state: active, deferred or held.
    #[arg(long)]
    state: Option<String>,
    /// Every queued message.
    #[arg(long)]
    all: bool,
    /// Do not ask before deleting or bouncing.
    #[arg(long)]
    yes: bool,
}

impl Selection {
    fn into_command(self, op: Op) -> (client::Command, bool) {
        let filter = Filter {
            dest: self.dest,
            state: self.state,
        };
        // A bare flush means every message, as postqueue -f does.
        let bare = self.ids.is_empty() && filter == Filter::default();
        let all = self.all || (op == Op::Flush && bare);
        let sel = Selector {
            ids: self.ids,
            filter,
            all,
        };
        (client::Command::QueueAct(op, sel), self.yes)
    }
}

/// Ask on the terminal; never assume yes without one.
fn confirmed(question: &str) -> Result<bool, String> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "{question} — not asked, stdin is not a terminal: add --yes"
        ));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

impl CtlCommand {
    /// The request to send, and whether its confirmation was given on the
    /// command line.
    fn into_command(self) -> (client::Command, bool) {
        match self {
            CtlCommand::Status => (client::Command::Status, false),
            CtlCommand::Nodes => (client::Command::Nodes, false),
            CtlCommand::Evict { name } => (client::Command::Evict(name), false),
            CtlCommand::Groups => (client::Command::Groups, false),
            CtlCommand::Move { group, node } => (client::Command::Move(group, node), false),
            CtlCommand::Reload => (client::Command::Reload, false),
            CtlCommand::Drain { node, cancel } => (client::Command::Drain(node, !cancel), false),
            CtlCommand::Queue { command } => command.into_command(),
        }
    }
}

impl QueueCommand {
    /// The request to send, and whether its confirmation was given on the
    /// command line.
    fn into_command(self) -> (client::Command, bool) {
        match self {
            QueueCommand::Summary => (client::Command::QueueSummary, false),
            QueueCommand::List {
                dest,
                state,
                after,
                limit,
            } => {
                let f = Filter { dest, state };
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                (client::Command::QueueList(f, after, limit), false)
            }
            QueueCommand::Show { id } => (client::Command::QueueShow(id), false),
            QueueCommand::Flush(s) => s.into_command(Op::Flush),
            QueueCommand::Hold(s) => s.into_command(Op::Hold),
            QueueCommand::Release(s) => s.into_command(Op::Release),
            QueueCommand::Delete(s) => s.into_command(Op::Delete),
            QueueCommand::Bounce(s) => s.into_command(Op::Bounce),
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config } => run(config.as_deref()),
        Command::Config {
            what: ConfigCommand::Default,
        } => {
            print!("{}", mtad::config::DEFAULT);
            ExitCode::SUCCESS
        }
        Command::Release { config } => release(&config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Passwd { user } => passwd(&user),
        Command::Demo {
            messages,
            keep,
            wipe,
        } => demo(messages, keep, wipe),
        Command::Ctl {
            admin,
            json,
            token_file,
            command,
        } => ctl(&admin, json, token_file, command),
    }
}

/// `mtad run`: run a node until SIGTERM or SIGINT.
fn run(config: Option<&Path>) -> ExitCode {
    let loaded = match config {
        Some(path) => load(path),
        None => mtad::config::load_default().map_err(|errors| {
            eprintln!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }),
    };
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::from(EXIT_FAILURE);
    };
    runtime.block_on(serve(cfg, config))
}

/// `mtad release`: remove this node's VIPs from their interfaces.
fn release(config: &Path) -> ExitCode {
    let cfg = match load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let Some(runtime) = small_runtime() else {
        return ExitCode::from(EXIT_FAILURE);
    };
    let mut code = ExitCode::SUCCESS;
    for r in runtime.block_on(mtad::resource::setup::release_vips(&cfg)) {
        match r {
            Ok(done) => println!("{done}"),
            Err(e) => {
                eprintln!("mtad release: {e}");
                code = ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    code
}

/// `mtad check-config`: report every error in `file`, or a summary of it.
fn check_config(file: &Path) -> ExitCode {
    let cfg = match mtad::config::load_file(file) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut problems = mtad::smtp::check_files(&cfg.smtp);
    if let Some(c) = &cfg.cluster {
        problems.extend(mtad::cluster::identity::check_secret_files(c));
    }
    if !problems.is_empty() {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let name = file.display().to_string();
        eprintln!("{}", mtad::config::file_errors(&text, &name, &problems));
        return ExitCode::from(EXIT_CONFIG);
    }
    let cluster = match &cfg.cluster {
        Some(c) => format!("cluster {} with {} seed(s)", c.name, c.seeds.len()),
        None => "single node".to_string(),
    };
    let witness = cfg
        .cluster
        .as_ref()
        .is_some_and(|c| c.role == mtad::config::ClusterRole::Witness);
    let mail = if witness {
        "a witness (no SMTP)".to_string()
    } else {
        format!(
            "{} listener(s), {} route(s)",
            cfg.smtp.listen.len(),
            cfg.routes.len()
        )
    };
    println!(
        "{}: ok: node {}, {mail}, {cluster}",
        file.display(),
        cfg.node.name,
    );
    ExitCode::SUCCESS
}

/// `mtad passwd`: a credentials line for `user`, the password on stdin.
fn passwd(user: &str) -> ExitCode {
    let mut password = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut password) {
        eprintln!("mtad passwd: cannot read the password: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let password = password.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("mtad passwd: an empty password; give it on stdin");
        return ExitCode::from(EXIT_FAILURE);
    }
    match mtad::smtp::auth::entry(user, password) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mtad passwd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `mtad demo`: the three-node demo; fails if it lost a message.
fn demo(messages: u64, keep: bool, wipe: bool) -> ExitCode {
    // The demo's nodes are this program, run again.
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mtad demo: cannot find this program: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::from(EXIT_FAILURE);
    };
    match runtime.block_on(mtad::demo::run(&exe, messages, wipe)) {
        Ok(mut report) => {
            if !keep && report.nothing_lost() {
                report.remove_files();
            }
            println!("{report}");
            if report.nothing_lost() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("mtad demo: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `mtad ctl`: send `command` to the admin API at `admin` and print the
/// answer, asking first when the command wants it and `--yes` was not
/// given.
fn ctl(admin: &str, json: bool, token_file: Option<PathBuf>, command: CtlCommand) -> ExitCode {
    let token = match token_file.map(std::fs::read_to_string).transpose() {
        Ok(t) => t.map(|t| t.trim().to_string()),
        Err(e) => {
            eprintln!("mtad ctl: cannot read the token file: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let (command, yes) = command.into_command();
    if let client::Command::QueueAct(_, sel) = &command {
        if sel.ids.is_empty() && sel.filter == Filter::default() && !sel.all {
            eprintln!(
                "mtad ctl: name the messages: queue ids, --dest, --state, or --all for every queued message"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if let Some(question) = command.confirmation().filter(|_| !yes) {
        match confirmed(&question) {
            Ok(true) => {}
            Ok(false) => {
                eprintln!("mtad ctl: not confirmed: nothing done");
                return ExitCode::from(EXIT_FAILURE);
            }
            Err(e) => {
                eprintln!("mtad ctl: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    let Some(runtime) = small_runtime() else {
        return ExitCode::from(EXIT_FAILURE);
    };
    let api = client::Api::new(admin, token);
    match runtime.block_on(client::run_with(&api, &command, json)) {
        Ok(out) => {
            print!("{}", out.text);
            match out.warning {
                Some(w) => {
                    eprintln!("mtad ctl: {w}");
                    ExitCode::from(EXIT_NOT_IN_CLUSTER)
                }
                None => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("mtad ctl: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The configuration in `path`; its errors are printed, and the exit
/// status for them returned.
fn load(path: &Path) -> Result<mtad::config::Config, ExitCode> {
    mtad::config::load_file(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// A runtime on all cores, for a node and for the demo's driver.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("mtad: cannot start the runtime: {e}"))
        .ok()
}

/// Run the node `cfg` (read from `path`, which reloads read again; none:
/// the built-in default, which a reload cannot change) until SIGTERM or
/// SIGINT.
async fn serve(cfg: mtad::config::Config, path: Option<&Path>) -> ExitCode {
    let logging = mtad::events::init(cfg.log.format, &cfg.log.level);
    mtad::metrics::install();
    raise_fd_limit();
    let node = match mtad::app::Node::start(cfg).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "mtad cannot start");
            eprintln!("mtad: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    tracing::info!("mtad ready");
    notify::ready();
    if let Some(every) = notify::watchdog_interval() {
        tokio::spawn(watchdog(node.health(), every));
    }
    let mut requests = node.reload_requests();
    // SIGTERM and SIGINT stop the node, SIGHUP reloads its configuration.
    use tokio::signal::unix::SignalKind;
    let mut term = signal(SignalKind::terminate());
    let mut int = signal(SignalKind::interrupt());
    let mut hup = signal(SignalKind::hangup());
    loop {
        let asked = async {
            match requests.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = next(&mut term) => break,
            _ = next(&mut int) => break,
            _ = next(&mut hup) => {
                reload(&node, path, &logging);
            }
            Some(reply) = asked => {
                let _ = reply.send(reload(&node, path, &logging));
            }
        }
    }
    tracing::info!("mtad stopping");
    notify::stopping();
    let grace = node.config().node.shutdown_grace;
    node.shutdown(grace).await;
    ExitCode::SUCCESS
}

/// Reload from `path`; without one there is nothing to read again.
fn reload(
    node: &mtad::app::Node,
    path: Option<&Path>,
    logging: &mtad::events::Logging,
) -> mtad::admin::ReloadOutcome {
    match path {
        Some(path) => mtad::reload::reload(node, path, logging),
        None => {
            let why = "running on the built-in default configuration: there is no file \
                       to read again (start with --config FILE)";
            tracing::error!("reload refused: {why}");
            mtad::admin::ReloadOutcome {
                changed: Vec::new(),
                errors: vec![why.to_string()],
                warnings: Vec::new(),
            }
        }
    }
}

/// Tell systemd the node is alive twice per watchdog interval — only while
/// the queue driver answers, so a wedged node is restarted rather than
/// vouched for.
async fn watchdog(health: mtad::app::Health, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tick.tick().await;
        match health.probe(every / 4).await {
            Ok(()) => notify::watchdog(),
            Err(why) => tracing::error!(%why, "no watchdog notification"),
        }
    }
}

/// A signal to act on, if it could be set up.
fn signal(kind: tokio::signal::unix::SignalKind) -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind)
        .map_err(|e| tracing::error!(error = %e, ?kind, "cannot handle a signal"))
        .ok()
}

/// The next delivery of `s` (never, without it).
async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Every SMTP session is a file descriptor; the usual soft limit of 1024
/// would turn a connection burst into accept errors. Raise the soft limit
/// to the hard one, as other servers do.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = lim.rlim_max;
            lim.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-files limit");
            }
        }
    }
    tracing::info!(limit = lim.rlim_cur, "open-files limit");
}

/// A one-thread runtime for the short-lived commands (ctl, release).
fn small_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("mtad: cannot start the runtime: {e}"))
        .ok()
}
