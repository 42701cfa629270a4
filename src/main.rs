//! The `mtad` command: run a node, check a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Exit status for a configuration error (sysexits EX_CONFIG is 78, but
/// the contract is EX_USAGE-style 64 for "your input is wrong").
const EXIT_CONFIG: u8 = 64;
/// Exit status when the node cannot start or fails at run time.
const EXIT_FAILURE: u8 = 1;
/// Exit status of `ctl` when the node answered but is not in its cluster
/// (its join was refused, or has not succeeded yet).
const EXIT_NOT_IN_CLUSTER: u8 = 2;
/// How long in-flight work may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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
enum Command {
    /// Run a node.
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
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
    /// Start a three-node demo cluster on loopback addresses with a built-in
    /// sink, stream mail to its VIP, kill the VIP's owner midway, restart
    /// it, and report.
    Demo {
        /// How many messages to send.
        #[arg(long, default_value_t = 200)]
        messages: u64,
    },
    /// Talk to a running node's admin API.
    Ctl {
        /// The node's admin API.
        #[arg(long, default_value = "http://127.0.0.1:8025")]
        admin: String,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { file } => match mtad::config::load_file(&file) {
            Ok(cfg) => {
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
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Ctl {
            admin,
            json,
            command,
        } => {
            let command = match command {
                CtlCommand::Status => mtad::admin::client::Command::Status,
                CtlCommand::Nodes => mtad::admin::client::Command::Nodes,
                CtlCommand::Evict { name } => mtad::admin::client::Command::Evict(name),
                CtlCommand::Groups => mtad::admin::client::Command::Groups,
                CtlCommand::Move { group, node } => mtad::admin::client::Command::Move(group, node),
            };
            let Some(runtime) = small_runtime() else {
                return ExitCode::from(EXIT_FAILURE);
            };
            match runtime.block_on(mtad::admin::client::run(&admin, &command, json)) {
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
        Command::Demo { messages } => {
            let exe = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("mtad demo: cannot find this program: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mtad: cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            match runtime.block_on(mtad::demo::run(&exe, messages)) {
                Ok(report) => {
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
        Command::Release { config } => {
            let cfg = match mtad::config::load_file(&config) {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
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
        Command::Run { config } => {
            let cfg = match mtad::config::load_file(&config) {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mtad: cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            runtime.block_on(run(cfg))
        }
    }
}

async fn run(cfg: mtad::config::Config) -> ExitCode {
    let _log = mtad::events::init(cfg.log.format, &cfg.log.level);
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
    wait_for_signal().await;
    tracing::info!("mtad stopping");
    node.shutdown(SHUTDOWN_GRACE).await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
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
