package io.flumen.flink;

import java.io.Serializable;
import java.util.ArrayList;
import java.util.List;

import org.apache.flink.table.catalog.Column;
import org.apache.flink.table.catalog.ResolvedSchema;
import org.apache.flink.table.data.GenericArrayData;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.types.logical.ArrayType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.LogicalTypeRoot;

/**
 * A model's rows: its INPUT columns into a request body, an answer into its OUTPUT
 * row. The OUTPUT schema's first column other than {@code error} is the prediction;
 * a STRING column named {@code error}, when declared, carries a failed row's
 * {@code kind: message} (and is null for answered rows).
 */
final class Rows implements Serializable {
    private static final long serialVersionUID = 1L;

    private final Settings settings;
    private final LogicalType[] inputs;
    private final int outputs;
    private final int prediction;
    private final LogicalType predictionType;
    private final int error;

    private Rows(Settings settings, LogicalType[] inputs, int outputs, int prediction, LogicalType type, int error) {
        this.settings = settings;
        this.inputs = inputs;
        this.outputs = outputs;
        this.prediction = prediction;
        this.predictionType = type;
        this.error = error;
    }

    /** The rows of a model, or every reason its schemas do not fit the protocol. */
    static Rows of(Settings s, ResolvedSchema input, ResolvedSchema output) {
        List<String> problems = new ArrayList<>();
        List<Column> in = input.getColumns();
        LogicalType[] inputs = new LogicalType[in.size()];
        for (int i = 0; i < inputs.length; i++) {
            inputs[i] = in.get(i).getDataType().getLogicalType();
        }
        if (s.protocol != Settings.Protocol.KSERVE
                && (inputs.length != 1 || !isString(inputs[0]))) {
            problems.add("INPUT: protocol " + s.protocol.name + " takes one STRING column, not " + input);
        }
        if (s.protocol == Settings.Protocol.KSERVE) {
            if (inputs.length == 0) {
                problems.add("INPUT: at least one column");
            }
            for (LogicalType t : inputs) {
                if (datatype(t) == null) {
                    problems.add("INPUT: " + t + " has no KServe datatype (STRING, FLOAT, DOUBLE, INT, BIGINT)");
                } else if (!datatype(t).equals(datatype(inputs[0]))) {
                    problems.add("INPUT: every column must have the same type for one tensor row");
                }
            }
        }
        List<Column> out = output.getColumns();
        int error = -1;
        int prediction = -1;
        for (int i = 0; i < out.size(); i++) {
            LogicalType t = out.get(i).getDataType().getLogicalType();
            if (out.get(i).getName().equalsIgnoreCase("error")) {
                if (!isString(t)) {
                    problems.add("OUTPUT: the error column must be STRING");
                }
                error = i;
            } else if (prediction < 0) {
                prediction = i;
            } else {
                problems.add("OUTPUT: one prediction column (and optionally `error STRING`), not " + output);
            }
        }
        LogicalType type = prediction < 0 ? null : out.get(prediction).getDataType().getLogicalType();
        if (type == null) {
            problems.add("OUTPUT: a prediction column is needed");
        } else if (s.protocol == Settings.Protocol.OPENAI_EMBEDDINGS && !isNumberArray(type)) {
            problems.add("OUTPUT: embeddings are ARRAY<FLOAT> or ARRAY<DOUBLE>, not " + type);
        } else if (s.protocol == Settings.Protocol.OPENAI_CHAT && !isString(type)) {
            problems.add("OUTPUT: chat answers are STRING, not " + type);
        } else if (!isString(type) && !isNumberArray(type) && !isNumber(type)) {
            problems.add("OUTPUT: " + type + " is not STRING, a number or an array of numbers");
        }
        if (!problems.isEmpty()) {
            throw new IllegalArgumentException("model schema: " + String.join("; ", problems));
        }
        return new Rows(s, inputs, out.size(), prediction, type, error);
    }

    private static boolean isString(LogicalType t) {
        return t.getTypeRoot() == LogicalTypeRoot.VARCHAR || t.getTypeRoot() == LogicalTypeRoot.CHAR;
    }

    private static boolean isNumber(LogicalType t) {
        switch (t.getTypeRoot()) {
            case FLOAT: case DOUBLE: case INTEGER: case BIGINT: return true;
            default: return false;
        }
    }

    private static boolean isNumberArray(LogicalType t) {
        return t.getTypeRoot() == LogicalTypeRoot.ARRAY
                && isNumber(((ArrayType) t).getElementType());
    }

    private static String datatype(LogicalType t) {
        switch (t.getTypeRoot()) {
            case VARCHAR: case CHAR: return "BYTES";
            case FLOAT: return "FP32";
            case DOUBLE: return "FP64";
            case INTEGER: return "INT32";
            case BIGINT: return "INT64";
            default: return null;
        }
    }

    /** The request body for one input row. */
    String body(RowData row) {
        if (settings.protocol != Settings.Protocol.KSERVE) {
            return Requests.text(settings, text(row, 0));
        }
        StringBuilder b = new StringBuilder("{\"inputs\":[{\"name\":");
        Json.string(b, settings.kserveInput);
        b.append(",\"shape\":[1,").append(inputs.length).append("],\"datatype\":\"")
                .append(datatype(inputs[0])).append("\",\"data\":[");
        for (int i = 0; i < inputs.length; i++) {
            if (i > 0) {
                b.append(',');
            }
            value(b, row, i);
        }
        return b.append("]}]}").toString();
    }

    private static String text(RowData row, int i) {
        return row.isNullAt(i) ? "" : row.getString(i).toString();
    }

    private void value(StringBuilder b, RowData row, int i) {
        if (row.isNullAt(i)) {
            b.append("null");
            return;
        }
        switch (inputs[i].getTypeRoot()) {
            case FLOAT: b.append(row.getFloat(i)); break;
            case DOUBLE: b.append(row.getDouble(i)); break;
            case INTEGER: b.append(row.getInt(i)); break;
            case BIGINT: b.append(row.getLong(i)); break;
            default: Json.string(b, row.getString(i).toString());
        }
    }

    /** The OUTPUT row of an answer; {@link IllegalArgumentException} when it holds no prediction of the declared type. */
    RowData answered(Object json) {
        Object p = Requests.prediction(settings, json);
        GenericRowData row = new GenericRowData(outputs);
        row.setField(prediction, convert(p));
        return row;
    }

    /** The OUTPUT row of a failed row: a null prediction and, if declared, its error. */
    RowData failed(String kind, String message) {
        GenericRowData row = new GenericRowData(outputs);
        if (error >= 0) {
            row.setField(error, StringData.fromString(kind + ": " + message));
        }
        return row;
    }

    private Object convert(Object p) {
        LogicalType t = predictionType;
        if (isString(t)) {
            Object v = p instanceof java.util.List ? Json.at(p, 0) : p;
            if (v == null) {
                throw new IllegalArgumentException("the answer has no prediction");
            }
            return StringData.fromString(v instanceof Double && ((Double) v) == Math.rint((Double) v)
                    ? String.valueOf(((Double) v).longValue()) : String.valueOf(v));
        }
        if (isNumberArray(t)) {
            if (!(p instanceof java.util.List)) {
                throw new IllegalArgumentException("the answer is not an array of numbers: " + p);
            }
            java.util.List<?> l = (java.util.List<?>) p;
            LogicalType e = ((ArrayType) t).getElementType();
            switch (e.getTypeRoot()) {
                case FLOAT: {
                    float[] a = new float[l.size()];
                    for (int i = 0; i < a.length; i++) {
                        a[i] = number(l.get(i)).floatValue();
                    }
                    return new GenericArrayData(a);
                }
                case DOUBLE: {
                    double[] a = new double[l.size()];
                    for (int i = 0; i < a.length; i++) {
                        a[i] = number(l.get(i));
                    }
                    return new GenericArrayData(a);
                }
                case INTEGER: {
                    int[] a = new int[l.size()];
                    for (int i = 0; i < a.length; i++) {
                        a[i] = number(l.get(i)).intValue();
                    }
                    return new GenericArrayData(a);
                }
                default: {
                    long[] a = new long[l.size()];
                    for (int i = 0; i < a.length; i++) {
                        a[i] = number(l.get(i)).longValue();
                    }
                    return new GenericArrayData(a);
                }
            }
        }
        Double v = number(p instanceof java.util.List ? Json.at(p, 0) : p);
        switch (t.getTypeRoot()) {
            case FLOAT: return v.floatValue();
            case DOUBLE: return v;
            case INTEGER: return v.intValue();
            default: return v.longValue();
        }
    }

    private static Double number(Object v) {
        if (!(v instanceof Double)) {
            throw new IllegalArgumentException("not a number in the answer: " + v);
        }
        return (Double) v;
    }
}
