//! The tensors' checks and conversions, without a server.

use super::*;

fn add_sub() -> Tensors {
    let t = |name: &str| Declared {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![-1, 4],
    };
    Tensors {
        inputs: vec![t("INPUT0"), t("INPUT1")],
        outputs: vec![t("OUTPUT0"), t("OUTPUT1")],
        batched: true,
        declared: true,
        platform: "python".into(),
        versions: vec!["1".into()],
        config: None,
    }
}

fn input(name: &str, datatype: &str, shape: Vec<i64>, n: usize) -> Input {
    Input {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        data: (0..n).map(|x| json!(x as f64)).collect(),
    }
}

#[test]
fn two_inputs_make_one_object_record_per_row() {
    let t = add_sub();
    let records = t
        .records(
            "m",
            &[
                input("INPUT1", "FP32", vec![2, 4], 8),
                input("INPUT0", "FP32", vec![2, 4], 8),
            ],
            16,
        )
        .unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["INPUT0"], json!([4.0, 5.0, 6.0, 7.0]));
    assert_eq!(records[1]["INPUT1"], json!([4.0, 5.0, 6.0, 7.0]));
}

#[test]
fn what_does_not_fit_is_refused_with_tritons_messages() {
    let t = add_sub();
    let ok = || input("INPUT0", "FP32", vec![1, 4], 4);
    let cases = [
        (
            vec![ok()],
            "expected 2 inputs but got 1 inputs for model 'm'",
        ),
        (
            vec![ok(), input("X", "FP32", vec![1, 4], 4)],
            "unexpected inference input 'X' for model 'm'",
        ),
        (
            vec![ok(), input("INPUT1", "FP64", vec![1, 4], 4)],
            "inference input 'INPUT1' data-type is 'FP64', but model 'm' expects 'FP32'",
        ),
        (
            vec![ok(), input("INPUT1", "FP32", vec![1, 8], 8)],
            "unexpected shape for input 'INPUT1' for model 'm'. Expected [-1,4], got [1,8]",
        ),
        (
            vec![ok(), input("INPUT1", "FP32", vec![1, 4], 3)],
            "shape [1,4] does not hold the 3 elements the request has",
        ),
        (vec![ok(), ok()], "input 'INPUT0' appears more than once"),
        (
            vec![ok(), input("INPUT1", "FP32", vec![2, 4], 8)],
            "different batch sizes",
        ),
    ];
    for (inputs, expected) in cases {
        let err = t.records("m", &inputs, 16).unwrap_err();
        assert!(matches!(err, Unfit::Invalid(_)), "{err:?}");
        assert!(err.message().contains(expected), "{err:?} lacks {expected}");
    }
    // Rows past the limit are refused before anything is built: a huge batch of
    // empty rows, or a shape whose product overflows.
    let ragged = |shape: Vec<i64>| Declared {
        name: "X".into(),
        datatype: "BYTES".into(),
        shape,
    };
    let any = Tensors {
        inputs: vec![ragged(vec![-1, -1])],
        outputs: vec![ragged(vec![-1, -1])],
        ..add_sub()
    };
    let huge = input("X", "BYTES", vec![1_000_000_000_000, 0], 0);
    assert!(matches!(
        any.records("m", &[huge], 16),
        Err(Unfit::TooMany(_))
    ));
    let wraps = input("X", "BYTES", vec![8, 1 << 62], 0);
    assert!(matches!(
        any.records("m", &[wraps], 16),
        Err(Unfit::Invalid(_))
    ));
    let generic = Tensors::generic();
    let huge = input("x", "FP32", vec![1_000_000, 1], 1);
    assert!(matches!(
        generic.records("m", &[huge], 16),
        Err(Unfit::TooMany(_))
    ));
    assert_eq!(
        t.requested("m", &["OUTPUT9".into()]).unwrap_err(),
        "unexpected inference output 'OUTPUT9' for model 'm'"
    );
}

#[test]
fn requested_outputs_come_back_by_name_with_declared_types_and_shapes() {
    let t = add_sub();
    let predictions = vec![
        json!({"OUTPUT0": [1.0, 2.0, 3.0, 4.0], "OUTPUT1": [0.0, 0.0, 0.0, 0.0]}),
        json!({"OUTPUT0": [5.0, 6.0, 7.0, 8.0], "OUTPUT1": [1.0, 1.0, 1.0, 1.0]}),
    ];
    let selected = t.requested("m", &["OUTPUT1".into()]).unwrap();
    let out = t.outputs(&selected, &predictions).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "OUTPUT1");
    assert_eq!(out[0].datatype, "FP32");
    assert_eq!(out[0].shape, vec![2, 4]);
    assert_eq!(out[0].data[4], json!(1.0));
    assert_eq!(
        t.outputs(&t.requested("m", &[]).unwrap(), &predictions)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn an_undeclared_model_takes_any_one_input_and_guesses_its_output() {
    let t = Tensors::generic();
    let records = t
        .records("m", &[input("x", "FP64", vec![3, 1], 3)], 16)
        .unwrap();
    assert_eq!(records, vec![json!(0.0), json!(1.0), json!(2.0)]);
    let two = [
        input("a", "FP32", vec![1, 1], 1),
        input("b", "FP32", vec![1, 1], 1),
    ];
    assert!(t
        .records("m", &two, 16)
        .unwrap_err()
        .message()
        .contains("expected 1 inputs but got 2"));
    let out = t.outputs(&[0], &[json!("a"), json!("b")]).unwrap();
    assert_eq!(
        (out[0].datatype.as_str(), out[0].shape.clone()),
        ("BYTES", vec![2, 1])
    );
    assert!(t.requested("m", &["y".into()]).is_err());
}
