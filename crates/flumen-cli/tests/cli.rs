//! The `flumen` binary end to end: one output line per input line, failures with
//! their reason, bad flags rejected with status 2.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;

fn flumen(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every output line is JSON"))
        .collect()
}

/// The JSON lines a run wrote to stdout, once it has exited 0 (else its stderr).
fn stdout_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out.stdout)
}

const FAST: [&str; 6] = ["--backend", "sim", "--sim-a-ms", "1", "--sim-b-ms", "0.01"];

#[test]
fn every_input_line_yields_exactly_one_output_line() {
    let mut input = String::new();
    for i in 0..2_000 {
        input.push_str(&format!("{{\"id\": {i}, \"text\": \"record {i}\"}}\n"));
    }
    let mut args = vec!["run", "--field", "text", "--order", "ordered"];
    args.extend(FAST);
    let out = flumen(&args, input.as_bytes());
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 2_000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["id"], i as u64, "ordered output");
        assert_eq!(line["prediction"], format!("record {i}"));
    }
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("2000 records"), "{summary}");
}

#[test]
fn bad_lines_fail_alone_with_their_line_number_and_the_run_goes_on() {
    let mut input = b"{\"id\":1,\"text\":\"a\"}\nnot json\n{\"id\":2}\n\xff\xfe\n\n{\"id\":3,\"text\":\"ok\"}\n".to_vec();
    input.extend(format!("{{\"id\":7,\"text\":\"{}\"}}\n", "x".repeat(300)).as_bytes());
    let dir = std::env::temp_dir().join(format!("flumen-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dead = dir.join("dead.jsonl");
    let mut args = vec![
        "run",
        "--field",
        "text",
        "--dead-letter",
        dead.to_str().unwrap(),
        "--max-record-bytes",
        "200",
    ];
    args.extend(FAST);
    let out = flumen(&args, &input);
    assert!(out.status.success());
    let mut ok: Vec<u64> = json_lines(&out.stdout)
        .iter()
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    ok.sort();
    assert_eq!(ok, vec![1, 3]);
    let dead = json_lines(&std::fs::read(&dead).unwrap());
    let mut reasons: Vec<(u64, String, String)> = dead
        .iter()
        .map(|d| {
            (
                d["line"].as_u64().unwrap(),
                d["error"]["kind"].as_str().unwrap().to_owned(),
                d["error"]["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4);
    assert_eq!(reasons[3].0, 7);
    assert!(
        reasons[3]
            .2
            .contains("line 7: record is 318 bytes, over the limit of 200"),
        "{}",
        reasons[3].2
    );
    assert_eq!(reasons[0].0, 2);
    assert!(reasons[0].2.starts_with("line 2: invalid JSON"));
    assert_eq!(reasons[1].0, 3);
    assert!(reasons[1].2.contains("field `text` is missing"));
    assert_eq!(reasons[2].0, 4);
    assert!(reasons[2].2.contains("invalid UTF-8"));
    assert!(reasons.iter().all(|r| r.1 == "invalid_input"));
    assert_eq!(dead[0]["error"]["attempts"], 0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn failures_set_the_exit_status_only_when_asked() {
    let input = b"{\"text\":\"a\"}\n{\"x\":1}\n";
    let mut args = vec!["run", "--field", "text"];
    args.extend(FAST);
    assert_eq!(flumen(&args, input).status.code(), Some(0));
    args.push("--fail-on-dead-letter");
    assert_eq!(flumen(&args, input).status.code(), Some(1));
}

#[test]
fn injected_backend_failures_become_dead_letters_not_losses() {
    let input: String = (0..500).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    let failed_with = |attempts: &str| {
        let mut args = vec!["run", "--sim-error-rate", "0.3", "--sim-seed", "9"];
        args.extend(["--max-attempts", attempts]);
        args.extend(FAST);
        let out = flumen(&args, input.as_bytes());
        let lines = json_lines(&out.stdout);
        assert_eq!(lines.len(), 500);
        let failed: Vec<&Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
        for l in &failed {
            assert_eq!(l["error"]["kind"], "transient");
            let n = l["error"]["attempts"].as_u64().unwrap();
            assert!(n <= attempts.parse().unwrap(), "{n} attempts");
        }
        failed.len()
    };
    let without = failed_with("1");
    assert!(
        (100..200).contains(&without),
        "{without} failed at a 30 % error rate"
    );
    let with = failed_with("4");
    assert!(
        with * 5 < without,
        "retries rescue most: {with} vs {without}"
    );
}

#[test]
fn bad_flags_exit_with_status_2_and_name_the_flag() {
    let out = flumen(&["run", "--concurrency", "lots"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrency"));
    let out = flumen(&["run", "--order", "sideways"], b"");
    assert_eq!(out.status.code(), Some(2));
    // Every problem at once, each with its flag.
    let out = flumen(
        &[
            "run",
            "--backend",
            "sim",
            "--capacity",
            "0",
            "--sim-slots",
            "0",
            "--order",
            "keyed",
            "--sim-error-rate",
            "2",
        ],
        b"",
    );
    common::names_every_problem(
        &out,
        &[
            "--capacity",
            "--sim-slots",
            "--key-field",
            "--sim-error-rate",
        ],
    );
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flumen-cli-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_config_file_reports_every_problem_with_its_path_and_exits_2() {
    let path = write_temp(
        "bad.toml",
        "[backend]\nkind = \"sim\"\nslots = 0\nerror_rate = 3.0\n\n[engine]\nconcurrency = \"lots\"\n\n[operator]\norder = \"keyed\"\n",
    );
    let out = flumen(&["run", "--config", path.to_str().unwrap()], b"");
    common::names_every_problem(
        &out,
        &[
            "backend.slots",
            "backend.error_rate",
            "engine.concurrency",
            "operator.key_field",
        ],
    );
    let path = write_temp("typo.toml", "[backend]\nkind = \"sim\"\nslotz = 2\n");
    let out = flumen(&["run", "--config", path.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slotz") && err.contains("typo.toml"), "{err}");
}

#[test]
fn a_config_file_runs_records_through_a_real_triton_server() {
    use flumen_kserve::server::{cost_model, TritonServer};
    let triton = TritonServer::start(&[cost_model("cost", 5.0, 0.1, 2, 64, false)])
        .expect("tritonserver starts (bash scripts/triton.sh installs it)");
    let config = format!(
        "[backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"cost\"\n\n[operator]\norder = \"ordered\"\n",
        triton.http_url()
    );
    let path = write_temp("triton.toml", &config);
    let input: String = (0..300)
        .map(|i| format!("{{\"id\":{i},\"x\":{i}.5}}\n"))
        .collect();
    let out = flumen(
        &["run", "--config", path.to_str().unwrap(), "--field", "x"],
        input.as_bytes(),
    );
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 300);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["id"], i as u64);
        assert_eq!(l["prediction"].as_f64(), Some(2.0 * (i as f64 + 0.5)));
    }
}

#[test]
fn the_default_backend_embeds_text_in_process_and_fails_non_text_alone() {
    let input = concat!(
        "{\"id\": 1, \"text\": \"The parcel arrived on time and intact.\"}\n",
        "{\"id\": 2, \"text\": 42}\n",
        "{\"id\": 3, \"text\": \"My package was delivered punctually and undamaged.\"}\n",
        "not json\n",
        "{\"id\": 5, \"text\": \"The parcel arrived on time and intact.\"}\n",
        "{\"id\": 6, \"text\": \"Quarks are bound by the strong force.\"}\n",
    );
    let out = flumen(
        &["run", "--field", "text", "--order", "ordered"],
        input.as_bytes(),
    );
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 6, "one line per record");
    let vector = |l: &Value| -> Vec<f64> {
        l["prediction"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (a, c, e) = (vector(&lines[0]), vector(&lines[2]), vector(&lines[4]));
    assert_eq!(a.len(), 384);
    let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
    assert_eq!(a, e, "same text, same vector");
    let cos = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    let unrelated = vector(&lines[5]);
    let (near, far) = (cos(&a, &c), cos(&a, &unrelated));
    assert!(
        near > 0.5 && near > far + 0.3,
        "paraphrase {near}, unrelated {far}"
    );
    assert_eq!(lines[1]["error"]["kind"], "invalid_input");
    assert!(lines[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("text"));
    assert_eq!(lines[3]["error"]["kind"], "invalid_input");
    assert!(lines[3]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("line 4"));
}

#[test]
fn demo_writes_the_built_in_reviews_with_their_embeddings() {
    let dir = std::env::temp_dir().join(format!("flumen-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.jsonl");
    let out = flumen(&["demo", "--output", path.to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&std::fs::read(&path).unwrap());
    assert_eq!(lines.len(), 1_000);
    let mut ids: Vec<u64> = lines.iter().map(|l| l["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..1_000).collect::<Vec<u64>>(), "every review once");
    assert!(lines
        .iter()
        .all(|l| l["prediction"].as_array().is_some_and(|v| v.len() == 384)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1000 records") && err.contains("1000 ok"),
        "{err}"
    );
    // The summary says what the model was sent and what the cache saved: the built-in
    // reviews repeat some texts, answered once.
    assert!(err.contains(" tokens sent, 0 received"), "{err}");
    assert!(
        err.contains("cache: ") && !err.contains("cache: 0 hits, 0 shared"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_pipeline_file_reports_every_problem_with_its_path_and_exits_2() {
    let path = write_temp(
        "pipeline.toml",
        "[source]\nkind = \"kafka\"\nbrokers = \"\"\ntopic = \"in\"\ngroup = \"\"\nstart = \"middle\"\n\n\
         [sink]\nkind = \"nats\"\nurl = \"http://x\"\nsubject = \"\"\n\n\
         [mapping]\nmax_record_bytes = 0\n\n\
         [backend]\nkind = \"sim\"\nslots = 0\n",
    );
    let out = flumen(&["run", path.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for p in [
        "source.brokers",
        "source.group",
        "source.start",
        "sink.url",
        "sink.subject",
        "mapping.max_record_bytes",
        "backend.slots",
    ] {
        assert!(
            err.contains(&format!("pipeline.toml: {p}")),
            "{p} not named in: {err}"
        );
    }
    // A type error names its field.
    let path = write_temp(
        "pipeline2.toml",
        "[source]\nkind = \"file\"\npath = 3\n\n[backend]\nkind = \"sim\"\n",
    );
    let out = flumen(&["run", path.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("path"));
}

#[test]
fn a_pipeline_file_runs_a_file_to_a_file_with_a_dead_letter_file() {
    let dir = std::env::temp_dir().join(format!("flumen-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    let mut text = String::new();
    for i in 0..500 {
        text.push_str(&format!("{{\"id\": {i}, \"body\": \"r{i}\"}}\n"));
    }
    text.push_str("{\"id\": 500}\n");
    std::fs::write(&input, text).unwrap();
    let (out, dead) = (dir.join("out.jsonl"), dir.join("dead.jsonl"));
    let cfg = write_temp(
        "file-pipeline.toml",
        &format!(
            "[source]\nkind = \"file\"\npath = \"{}\"\n\n[mapping]\ninput = \"body\"\noutput = \"echo\"\n\n\
             [sink]\nkind = \"file\"\npath = \"{}\"\n\n[dead_letter]\nkind = \"file\"\npath = \"{}\"\n\n\
             [backend]\nkind = \"sim\"\na_ms = 1.0\nb_ms = 0.01\n\n[operator]\norder = \"ordered\"\n",
            input.display(),
            out.display(),
            dead.display()
        ),
    );
    let run = flumen(&["run", cfg.to_str().unwrap()], b"");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let outs = json_lines(&std::fs::read(&out).unwrap());
    assert_eq!(outs.len(), 500);
    assert!(outs
        .iter()
        .enumerate()
        .all(|(i, o)| o["id"] == i as u64 && o["echo"] == format!("r{i}")));
    let dead = json_lines(&std::fs::read(&dead).unwrap());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["source"], "line 501");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[allow(clippy::disallowed_methods)] // waits on a child process in real time
fn metrics_are_served_while_a_run_is_going() {
    use std::io::{BufRead, Read};
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["run", "--metrics-addr", &addr];
    args.extend(FAST);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for i in 0..50 {
        writeln!(stdin, "{{\"id\": {i}}}").unwrap();
    }
    stdin.flush().unwrap();
    // Wait for all 50 outcomes, then scrape while the run is still open.
    let mut line = String::new();
    for _ in 0..50 {
        line.clear();
        stdout.read_line(&mut line).unwrap();
    }
    let mut conn = std::net::TcpStream::connect(&addr).expect("metrics listener");
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let outcomes: f64 = body
        .lines()
        .filter(|l| l.starts_with("flumen_outcomes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(outcomes, 50.0, "{body}");
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
#[allow(clippy::disallowed_methods)] // signals a child process in real time
fn a_second_signal_exits_at_once() {
    use std::io::{BufRead, Read};
    use std::time::Duration;
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        // A backend call takes 60 s: draining after the first signal would too.
        .args(["run", "--backend", "sim", "--sim-a-ms", "60000"])
        .args(["--metrics-addr", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{{\"id\": 1}}").unwrap();
    stdin.flush().unwrap();
    // stderr, line by line, on a thread (the progress line ends in \r, not \n).
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(std::mem::take(&mut line));
        }
    });
    // Signal only once the record is at the backend: the source has been read, so
    // the signal listener is installed (a signal before that kills by default).
    let in_flight = || {
        let mut conn = std::net::TcpStream::connect(&addr).ok()?;
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).ok()?;
        let busy = body
            .lines()
            .filter(|l| l.starts_with("flumen_batches_in_flight"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        (busy >= 1.0).then_some(())
    };
    let mut tries = 0;
    while in_flight().is_none() {
        tries += 1;
        assert!(tries < 1200, "the record never reached the backend");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    let kill = || Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    kill();
    let stopping = |line: &String| line.contains("stopping: finishing the records in flight");
    let mut err = String::new();
    while !stopping(&err) {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the first signal is reported");
        err.push_str(&line);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal drains"
    );
    kill();
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            waited < Duration::from_secs(30),
            "the second signal did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    };
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        err.push_str(&line);
    }
    assert!(err.contains("exiting at once"), "{err}");
}

/// A pipeline with a file source and sink (sim backend), for the tests below.
fn file_pipeline(
    name: &str,
    input: &std::path::Path,
    output: &std::path::Path,
) -> std::path::PathBuf {
    write_temp(
        name,
        &format!(
            "[source]\nkind = \"file\"\npath = \"{}\"\n\n[sink]\nkind = \"file\"\npath = \"{}\"\n\n\
             [backend]\nkind = \"sim\"\na_ms = 1.0\nb_ms = 0.01\n",
            input.display(),
            output.display()
        ),
    )
}

#[test]
fn flags_that_a_pipeline_file_configures_are_refused_beside_it() {
    let input = write_temp("refuse-in.jsonl", "{\"a\": 1}\n");
    let output = input.with_extension("out");
    let pipe = file_pipeline("refuse.toml", &input, &output);
    let out = flumen(
        &[
            "run",
            pipe.to_str().unwrap(),
            "--capacity",
            "0",
            "--order",
            "keyed",
            "--backend",
            "embedded",
            "--excerpt-bytes",
            "0",
        ],
        b"",
    );
    common::names_every_problem(
        &out,
        &[
            "--capacity",
            "--order",
            "--backend",
            "refuse.toml",
            "--excerpt-bytes: must be > 0",
        ],
    );
    // An input beside --config would be ignored for the file's [source]: refused.
    let out = flumen(
        &[
            "run",
            "--config",
            pipe.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
        b"",
    );
    common::names_every_problem(&out, &["an input beside --config"]);
    // Those that say where records go are applied, and win over the file.
    let out = flumen(
        &[
            "run",
            pipe.to_str().unwrap(),
            "--output-field",
            "echo",
            "--quiet",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&std::fs::read(&output).unwrap());
    assert_eq!(lines.len(), 1);
    assert!(lines[0].get("echo").is_some(), "{}", lines[0]);
}

#[test]
fn every_unknown_key_of_a_pipeline_file_is_named_with_its_line() {
    let pipe = write_temp(
        "unknown.toml",
        "[source]\nkind = \"stdin\"\n\n[mapping]\ninput = \"text\"\noutptu = \"x\"\n\n\
         [backend]\nkind = \"sim\"\nslotz = 2\n\n[operator]\ncapacity = 10\ncolour = \"red\"\n",
    );
    let out = flumen(&["run", pipe.to_str().unwrap()], b"");
    common::names_every_problem(
        &out,
        &[
            "line 6: unknown key `outptu`",
            "line 10: unknown key `slotz`",
            "line 14: unknown key `colour`",
        ],
    );
}

#[test]
fn a_pipeline_file_is_told_apart_by_its_content_and_a_file_run_starts_its_output_anew() {
    let input = write_temp("sniff-in.jsonl", "{\"a\": 1}\n{\"a\": 2}\n[1, 2]\n");
    let output = input.with_extension("out");
    let toml = std::fs::read_to_string(file_pipeline("sniff.toml", &input, &output)).unwrap();
    // Not named *.toml: read as a pipeline all the same (it has a [backend] table).
    let pipe = write_temp("pipeline.conf", &toml);
    for _ in 0..2 {
        let out = flumen(&["run", pipe.to_str().unwrap(), "--quiet"], b"");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A file source is read again from its start by a rerun: the output is
        // replaced, not appended to.
        assert_eq!(json_lines(&std::fs::read(&output).unwrap()).len(), 3);
    }
    // A JSONL file, one of whose lines starts like a TOML table, is still input.
    let mut args = vec!["run", input.to_str().unwrap(), "--quiet"];
    args.extend(FAST);
    assert_eq!(stdout_lines(&flumen(&args, b"")).len(), 3);
}

#[test]
fn help_describes_pipeline_files() {
    let out = flumen(&["run", "--help"], b"");
    let help = String::from_utf8_lossy(&out.stdout);
    for want in ["Pipeline files", "kafka", "nats", "[delivery]", "130"] {
        assert!(help.contains(want), "{want} in {help}");
    }
}

/// 50,000 lines of input in a file.
fn long_input(name: &str) -> std::path::PathBuf {
    let text: String = (0..50_000).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    write_temp(name, &text)
}

#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    use std::io::BufRead;
    let input = long_input("head-in.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", input.to_str().unwrap(), "--quiet"])
        .args(FAST)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -3`: read three lines, then close the pipe.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with('{'), "{line}");
    }
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("Broken pipe") && !err.contains("error"),
        "{err}"
    );
}

#[test]
#[allow(clippy::disallowed_methods)] // signals a child process in real time
fn an_interrupted_file_run_exits_130_and_says_how_far_it_got() {
    use std::time::Duration;
    let input = long_input("int-in.jsonl");
    let output = input.with_extension("out");
    let _ = std::fs::remove_file(&output);
    let child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args([
            "run",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ])
        // Slow enough that the run is far from done when interrupted.
        .args(["--backend", "sim", "--sim-a-ms", "20", "--sim-b-ms", "0.5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Outputs exist: the loop runs, so the signal listener (installed before it) is.
    let lines = |p: &std::path::Path| {
        std::fs::read(p)
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0)
    };
    let mut tries = 0;
    while lines(&output) < 100 {
        tries += 1;
        assert!(tries < 1200, "no output");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let written = lines(&output);
    assert!(written < 50_000, "interrupted before the end: {written}");
    assert!(
        err.contains(&format!("interrupted: {written} records done and written")),
        "{err}"
    );
}

#[test]
fn log_format_stands_beside_a_pipeline_file_and_logs_json() {
    let input = write_temp("logjson.jsonl", "{\"id\": 1}\n{\"id\": 2}\n");
    let output = input.with_extension("out");
    let pipe = file_pipeline("logjson.toml", &input, &output);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["--log-format", "json", "run", pipe.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen starts");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(std::fs::read_to_string(&output).unwrap().lines().count(), 2);
    // The run's start is logged at debug level: one JSON object, with its fields.
    let logs: Vec<Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let start = logs
        .iter()
        .find(|v| v["fields"]["message"] == "run starting")
        .unwrap_or_else(|| panic!("no JSON log of the run's start in: {err}"));
    assert_eq!(start["level"], "DEBUG");
    assert_eq!(start["fields"]["source"], "file");
}

/// 200 bulk records, then 10 interactive ones, read at once into an engine of one
/// call at a time (200 ms, 8 records each): the interactive records ride the calls
/// right after the first, far ahead of the bulk backlog read before them. A
/// priority that is not a class fails its record alone, naming the field.
#[test]
fn interactive_records_overtake_a_bulk_backlog_and_a_bad_class_fails_alone() {
    let mut input = String::new();
    for i in 0..200 {
        input.push_str(&format!(
            "{{\"id\": {i}, \"text\": \"b{i}\", \"p\": \"bulk\"}}\n"
        ));
    }
    for i in 200..210 {
        input.push_str(&format!(
            "{{\"id\": {i}, \"text\": \"i{i}\", \"p\": \"interactive\", \"who\": \"ann\"}}\n"
        ));
    }
    input.push_str("{\"id\": 300, \"text\": \"x\", \"p\": \"urgent\"}\n");
    input.push_str("{\"id\": 301, \"text\": \"y\", \"p\": 9}\n");
    input.push_str("{\"id\": 302, \"text\": \"z\", \"p\": 0}\n");
    let args = [
        "run",
        "--field",
        "text",
        "--priority-field",
        "p",
        "--tenant-field",
        "who",
        "--backend",
        "sim",
        "--sim-a-ms",
        "200",
        "--sim-b-ms",
        "0.01",
        "--concurrency",
        "1",
        "--max-batch",
        "8",
    ];
    let out = flumen(&args, input.as_bytes());
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 213);
    // A failure carries its record under `record`.
    let position = |id: u64| {
        lines
            .iter()
            .position(|l| l["id"] == id || l["record"]["id"] == id)
            .unwrap()
    };
    // The first call leaves at once with what was read by then (at most 8); the
    // interactive records (and id 302, level 0) fill the next two.
    for id in (200..210).chain([302]) {
        assert!(position(id) < 8 + 16, "id {id} at {}", position(id));
        assert!(lines[position(id)].get("prediction").is_some());
    }
    for (id, value) in [(300, "\"urgent\""), (301, "9")] {
        let line = &lines[position(id)];
        assert_eq!(line["error"]["kind"], "invalid_input", "{line}");
        let message = line["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("field `p`") && message.contains(value),
            "{message}"
        );
    }
}
