package io.flumen.flink;

import org.apache.flink.table.functions.AsyncPredictFunction;
import org.apache.flink.table.functions.PredictFunction;
import org.apache.flink.table.ml.AsyncPredictRuntimeProvider;
import org.apache.flink.table.ml.PredictRuntimeProvider;

/** The runtime side of a {@code flumen} model: async (the default) or, with {@code 'async' = 'false'}, sync. */
final class FlumenModelProvider implements AsyncPredictRuntimeProvider, PredictRuntimeProvider {
    private final Settings settings;
    private final Rows rows;

    FlumenModelProvider(Settings settings, Rows rows) {
        this.settings = settings;
        this.rows = rows;
    }

    @Override
    public AsyncPredictFunction createAsyncPredictFunction(Context context) {
        return new FlumenAsyncPredictFunction(new Predictor(settings, rows));
    }

    @Override
    public PredictFunction createPredictFunction(Context context) {
        return new FlumenPredictFunction(new Predictor(settings, rows));
    }

    @Override
    public FlumenModelProvider copy() {
        return new FlumenModelProvider(settings, rows);
    }
}
