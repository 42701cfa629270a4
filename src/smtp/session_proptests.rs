//! Property tests: arbitrary input never panics, never breaks reply
//! framing, never delivers without recipients, and is split-invariant.

use proptest::prelude::*;

use super::super::Output;
use super::{cfg, run_with, OUTSIDER, RELAY};

fn command() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"EHLO c.test\r\n".to_vec()),
        Just(b"HELO c.test\r\n".to_vec()),
        Just(b"MAIL FROM:<a@b.test>\r\n".to_vec()),
        Just(b"MAIL FROM:<>\r\n".to_vec()),
        Just(b"RCPT TO:<u@example.test>\r\n".to_vec()),
        Just(b"RCPT TO:<u@far.test>\r\n".to_vec()),
        Just(b"RCPT TO:<postmaster>\r\n".to_vec()),
        Just(b"DATA\r\n".to_vec()),
        Just(b"hello\r\n.\r\n".to_vec()),
        Just(b"x\n.\n".to_vec()),
        Just(b"RSET\r\nNOOP\r\n".to_vec()),
        Just(b"QUIT\r\n".to_vec()),
        Just(b"BDAT 5\r\n".to_vec()),
        "[A-Z]{1,8} [ -~]{0,40}\r\n".prop_map(String::into_bytes),
        "(MAIL FROM|RCPT TO):<[ -~]{0,30}>[ -~]{0,20}\r?\n".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..600),
    ]
}

fn check(out: &[Output]) -> Result<(), TestCaseError> {
    for o in out {
        match o {
            Output::Reply(r) => {
                prop_assert!(r.ends_with("\r\n"), "{r:?}");
                let lines: Vec<&str> = r[..r.len() - 2].split("\r\n").collect();
                for (i, line) in lines.iter().enumerate() {
                    let b = line.as_bytes();
                    prop_assert!(b.len() >= 4, "{r:?}");
                    prop_assert!((b'2'..=b'5').contains(&b[0]), "{r:?}");
                    prop_assert!(b[1].is_ascii_digit() && b[2].is_ascii_digit(), "{r:?}");
                    let sep = if i + 1 == lines.len() { b' ' } else { b'-' };
                    prop_assert_eq!(b[3], sep, "{:?}", r);
                    prop_assert!(!line.contains(['\r', '\n']));
                }
            }
            Output::Deliver(m) => prop_assert!(!m.recipients.is_empty()),
            Output::Close => {}
            Output::StartTls => prop_assert!(false, "STARTTLS is not configured here"),
            Output::Verify { .. } => prop_assert!(false, "AUTH is not configured here"),
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_input_is_handled(
        relay in any::<bool>(),
        cmds in prop::collection::vec(command(), 0..40),
        cut in any::<prop::sample::Index>(),
    ) {
        let input = cmds.concat();
        let ip = if relay { RELAY } else { OUTSIDER };
        let whole = run_with(cfg(), ip, &[&input]);
        check(&whole)?;
        let at = cut.index(input.len() + 1);
        let split = run_with(cfg(), ip, &[&input[..at], &input[at..]]);
        prop_assert_eq!(split, whole);
    }
}
