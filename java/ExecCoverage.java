/*
 * ExecCoverage: tells from JaCoCo execution data whether a test ran its focal method, for the
 * execution harness of issue 30 (docs/execution.md, "focal_covered"). ExecRunner loads it, with
 * org.jacoco.core and ASM, in a class loader of its own inside the sandbox; it has no command.
 *
 *     new ExecCoverage().covered(execData, classBytes, "getCharsetName")  ->  "yes"
 *
 * The focal method is known by its name (a constructor's is "<init>"): the corpus maps a test to
 * its focal method by name (methods2test: the first overload declared wins), so every overload
 * counts. "yes" when one of them executed at least one instruction, "no" when none did, "na"
 * when the class has no method of that name.
 */

import java.io.ByteArrayInputStream;
import org.jacoco.core.analysis.Analyzer;
import org.jacoco.core.analysis.CoverageBuilder;
import org.jacoco.core.analysis.IClassCoverage;
import org.jacoco.core.analysis.IMethodCoverage;
import org.jacoco.core.data.ExecutionDataReader;
import org.jacoco.core.data.ExecutionDataStore;
import org.jacoco.core.data.SessionInfoStore;

public final class ExecCoverage {
    public String covered(byte[] exec, byte[] classBytes, String method) throws Exception {
        ExecutionDataStore store = new ExecutionDataStore();
        ExecutionDataReader reader = new ExecutionDataReader(new ByteArrayInputStream(exec));
        reader.setExecutionDataVisitor(store);
        reader.setSessionInfoVisitor(new SessionInfoStore());
        reader.read();
        CoverageBuilder builder = new CoverageBuilder();
        new Analyzer(store, builder).analyzeClass(classBytes, "focal");
        String found = "na";
        for (IClassCoverage c : builder.getClasses()) {
            for (IMethodCoverage m : c.getMethods()) {
                if (!m.getName().equals(method)) {
                    continue;
                }
                if (m.getInstructionCounter().getCoveredCount() > 0) {
                    return "yes";
                }
                found = "no";
            }
        }
        return found;
    }
}
