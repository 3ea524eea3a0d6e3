package qrsight.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.context.ApplicationScoped;
import javax.enterprise.inject.Produces;

/**
 * Stands in for the bean that Apicurio's config-index build step would make: the list of
 * properties an admin may change at run time. The test registry offers none.
 */
@ApplicationScoped
public class DynamicConfig {

    @Produces
    @ApplicationScoped
    public DynamicConfigPropertyList dynamicConfigPropertyList() {
        return new DynamicConfigPropertyList(List.of());
    }
}
