step crash
echo c > /proc/sysrq-trigger
sleep 30
